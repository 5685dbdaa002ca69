"""The `elastune` command line."""

from __future__ import annotations

import argparse
import asyncio
import sys


def _serve(role: str) -> int:
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
    elif role == "scaler":
        from .scaler.config import ScalerConfig
        from .scaler.server import main

        asyncio.run(main(from_env(ScalerConfig)))
    return 0


def _up(args: argparse.Namespace) -> int:
    from .launcher import UpOptions, run_up

    return run_up(UpOptions(model=args.model, prefill=args.prefill, decode=args.decode, port=args.port,
                            host=args.host, threads=args.threads, autoscale=args.autoscale,
                            scaledobjects=args.scaledobjects, events=args.events))


def _model_create(args: argparse.Namespace) -> int:
    from .engine.tiny import create_tiny_model, default_model_dir

    out = args.out or (str(default_model_dir()) if args.kind == "tiny" else None)
    if out is None:
        print(f"elastune: give --out for model kind {args.kind!r}", file=sys.stderr)
        return 2
    print(create_tiny_model(out, kind=args.kind))
    return 0


def _store(args: argparse.Namespace) -> int:
    from .common.logging import configure_logging
    from .common.store import serve_embedded

    configure_logging("store")
    serve_embedded(args.port)
    return 0


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
    up.set_defaults(func=_up)

    serve = sub.add_parser("serve", help="run one service (configured by ELASTUNE_* environment variables)")
    serve.add_argument("role", choices=["gateway", "prefill", "decode", "scaler"])
    serve.set_defaults(func=lambda a: _serve(a.role))

    model = sub.add_parser("model", help="model utilities")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    create = model_sub.add_parser("create", help="write a tiny fixed-seed model in Hugging Face format")
    create.add_argument("kind", choices=["tiny"])
    create.add_argument("--out", default="", help="output directory (default: $ELASTUNE_HOME/models/tiny)")
    create.set_defaults(func=_model_create)

    store = sub.add_parser("store", help="run the embedded Valkey store and print its URL")
    store.add_argument("--port", type=int, default=None)
    store.set_defaults(func=_store)

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
