"""The `elastune` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys


def _serve(role: str, worker: str = "") -> int:
    from .common.config import from_env
    from .common.logging import configure_logging

    configure_logging(role)
    if role == "gateway":
        from .gateway.config import GatewayConfig
        from .gateway.server import main

        asyncio.run(main(from_env(GatewayConfig)))
    elif role == "prefill":
        from .prefill.config import PrefillConfig
        from .prefill.server import main

        asyncio.run(main(from_env(PrefillConfig)))
    elif role == "decode":
        from .decode.config import DecodeConfig
        from .decode.server import main

        asyncio.run(main(from_env(DecodeConfig)))
    elif role == "experts":
        from .experts.config import ExpertsConfig
        from .experts.server import main

        asyncio.run(main(from_env(ExpertsConfig)))
    elif role == "scaler":
        from .scaler.config import ScalerConfig
        from .scaler.server import main

        asyncio.run(main(from_env(ScalerConfig)))
    elif role == "tuner":
        from .tuner.config import TunerConfig
        from .tuner.sidecar import main

        asyncio.run(main(from_env(TunerConfig, worker=worker or None)))
    return 0


def _up(args: argparse.Namespace) -> int:
    from .launcher import UpOptions, run_up

    return run_up(UpOptions(model=args.model, prefill=args.prefill, decode=args.decode, port=args.port,
                            host=args.host, threads=args.threads, autoscale=args.autoscale,
                            scaledobjects=args.scaledobjects, events=args.events, tune=args.tune,
                            experts=args.experts))


def _model_create(args: argparse.Namespace) -> int:
    from .engine.tiny import create_tiny_model, default_model_dir

    if args.kind == "tiny-moe":
        from .engine.tiny_moe import create_tiny_moe_model, default_moe_model_dir

        print(create_tiny_moe_model(args.out or default_moe_model_dir()))
        return 0
    out = args.out or (str(default_model_dir()) if args.kind == "tiny" else None)
    if out is None:
        print(f"elastune: give --out for model kind {args.kind!r}", file=sys.stderr)
        return 2
    print(create_tiny_model(out, kind=args.kind))
    return 0


def _experts_placement(args: argparse.Namespace) -> int:
    import os

    from .experts.admin import main

    url = args.store or os.environ.get("REDIS_URL", "")
    if not url:
        print("elastune: give --store or REDIS_URL (the store the experts servers use)", file=sys.stderr)
        return 2
    return main(url, args.prefix, args.replicate, args.auto)


def _store(args: argparse.Namespace) -> int:
    from .common.logging import configure_logging
    from .common.store import serve_embedded

    configure_logging("store")
    serve_embedded(args.port)
    return 0


def _drain(args: argparse.Namespace) -> int:
    import grpc

    from .common.drain import drain

    try:
        remaining = drain(args.address, args.grace)
    except grpc.RpcError as exc:
        print(f"elastune: drain {args.address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    print(f"drained {args.address}: {remaining} sequences still running", flush=True)
    return 0 if remaining == 0 else 1


def _protos(args: argparse.Namespace) -> int:
    from .proto.generate import generate

    for path in generate():
        print(path)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiment.config import ConfigError
    from .experiment.runner import run_experiment, write_report

    try:
        if args.experiment_command == "run":
            run_experiment(args.config, args.out)
        else:
            print(write_report(args.dir))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"elastune: {exc}", file=sys.stderr)
        return 2
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastune", description="Elastic, self-tuning LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run the whole pipeline on this machine")
    up.add_argument("--model", default="", help="Hugging Face model directory (default: the tiny model, created on first use)")
    up.add_argument("--prefill", type=int, default=1, help="prefill worker processes")
    up.add_argument("--decode", type=int, default=1, help="decode worker processes")
    up.add_argument("--port", type=int, default=8000, help="HTTP port of the OpenAI API")
    up.add_argument("--host", default="127.0.0.1", help="address every service binds")
    up.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: cores / workers)")
    up.add_argument("--autoscale", action="store_true",
                    help="run the KEDA external scaler and a local autoscaler that follows KEDA and the HPA")
    up.add_argument("--scaledobjects", default="", help="ScaledObject YAML folder for --autoscale (default: k8s/local)")
    up.add_argument("--events", default="", help="with --autoscale: append scaling events to this file (JSON lines)")
    up.add_argument("--tune", action="store_true",
                    help="one tuner sidecar per worker: runtime config from the tuning table (elastune profile)")
    up.add_argument("--experts", type=int, default=-1,
                    help="MoE models: expert groups, each an experts server process (0: experts inside the workers; "
                         "default: 2 for an MoE model). --model tiny-moe serves the tiny MoE model")
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run one service (configured by ELASTUNE_* environment variables)")
    serve.add_argument("role", choices=["gateway", "prefill", "decode", "scaler", "tuner", "experts"])
    serve.add_argument("--worker", default="", help="tuner: the worker's host:port (or ELASTUNE_WORKER)")
    serve.set_defaults(func=lambda a: _serve(a.role, a.worker))

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    create = model_sub.add_parser("create", help="write a tiny fixed-seed model in Hugging Face format")
    create.add_argument("kind", choices=["tiny", "tiny-moe"], help="tiny: Llama; tiny-moe: Mixtral, 8 experts, top-2")
    create.add_argument("--out", default="", help="output directory (default: $ELASTUNE_HOME/models/<kind>)")
    create.set_defaults(func=_model_create)

    experts = sub.add_parser("experts", help="MoE expert groups")
    experts_sub = experts.add_subparsers(dest="experts_command", required=True)
    placement = experts_sub.add_parser("placement", help="show or change which expert groups serve which experts")
    placement.add_argument("--store", default="", help="redis:// URL of the store (default: REDIS_URL)")
    placement.add_argument("--prefix", default="elastune", help="store key prefix")
    placement.add_argument("--replicate", action="append", default=[], metavar="EXPERT:GROUP",
                           help="copy an expert into a group (repeatable; a new group name creates the group)")
    placement.add_argument("--auto", action="store_true",
                           help="copy hot experts into cold groups until the groups' token shares are balanced")
    placement.set_defaults(func=_experts_placement)

    store = sub.add_parser("store", help="run the embedded Valkey store and print its URL")
    store.add_argument("--port", type=int, default=None)
    store.set_defaults(func=_store)

    from .tuner.commands import add_commands as add_tuner_commands

    add_tuner_commands(sub)

    drain = sub.add_parser("drain", help="drain a worker through its Admin RPC (a Kubernetes preStop hook)")
    drain.add_argument("--address", required=True, help="the worker's gRPC address, e.g. 127.0.0.1:50052")
    drain.add_argument("--grace", type=float, default=0.0, help="seconds the worker may take (0: its drain_grace_s)")
    drain.set_defaults(func=_drain)

    experiment = sub.add_parser("experiment", help="run experiments (simulated or on the local stack) and report them")
    experiment_sub = experiment.add_subparsers(dest="experiment_command", required=True)
    run = experiment_sub.add_parser("run", help="run every run of CONFIG.yaml into a results folder")
    run.add_argument("config", help="experiment YAML (see services/experiment/config.py and experiments/)")
    run.add_argument("--out", default="results/experiments", help="parent folder of the results folder")
    run.set_defaults(func=_experiment)
    rep = experiment_sub.add_parser("report", help="re-make report.md and the figures of a results folder")
    rep.add_argument("dir", help="a results folder written by `experiment run`")
    rep.set_defaults(func=_experiment)

    protos = sub.add_parser("protos", help="regenerate the gRPC stubs from protos/")
    protos.set_defaults(func=_protos)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
