"""The tuner's command line: `elastune profile` and `elastune tuning export|import|show|split`.

The store is REDIS_URL (or --store); without one, `profile` only writes its JSON export.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from ..common import keys


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v.strip())


def _store_url(args: argparse.Namespace) -> str:
    return args.store or os.environ.get("REDIS_URL", "")


async def _with_store(url: str, fn):
    from ..common.store import connect

    store = connect(url)
    try:
        return await fn(store)
    finally:
        await store.aclose()


def _profile(args: argparse.Namespace) -> int:
    from ..engine.moe_config import is_moe_dir
    from ..engine.tiny import ensure_tiny_model
    from .profiler import ProfileGrid, SubprocessProbe, device_kind, format_report, profile
    from .shares import MpsDaemon, ShareMechanism
    from .table import TuningTable

    defaults = ProfileGrid()
    model_dir = str(Path(args.model).resolve()) if args.model else ""  # empty: the (dense) tiny model
    moe = bool(model_dir) and is_moe_dir(model_dir)
    stages = tuple(s for s in args.stages.split(",") if s) or defaults.stages + (("experts",) if moe else ())
    if "experts" in stages and not moe:
        print(f"elastune profile: stage experts needs an MoE model directory (--model), not "
              f"{model_dir or 'the dense tiny model'}", file=sys.stderr)
        return 2
    grid = ProfileGrid(
        stages=stages,
        prefill_batches=_ints(args.prefill_batches) if args.prefill_batches else defaults.prefill_batches,
        prompt_lens=_ints(args.prompt_lens) if args.prompt_lens else defaults.prompt_lens,
        decode_batches=_ints(args.decode_batches) if args.decode_batches else defaults.decode_batches,
        context_lens=_ints(args.context_lens) if args.context_lens else defaults.context_lens,
        experts_micro_batches=(_ints(args.experts_micro_batches) if args.experts_micro_batches
                               else defaults.experts_micro_batches),
        experts_call_tokens=(_ints(args.experts_call_tokens) if args.experts_call_tokens
                             else defaults.experts_call_tokens),
        shares=_floats(args.shares) if args.shares else (),
        epsilon=args.epsilon,
    )
    try:
        grid.validate()
    except ValueError as exc:
        print(f"elastune profile: {exc}", file=sys.stderr)
        return 2
    model_dir = model_dir or str(ensure_tiny_model())
    model = model_dir.rstrip("/").rsplit("/", 1)[-1]
    mechanism = ShareMechanism.for_device(args.device)
    shares = list(grid.shares) or mechanism.grid(args.share_step)
    probe = SubprocessProbe(model_dir, args.device, args.dtype, mechanism, args.warmup, args.reps)
    device = device_kind(args.device)
    if mechanism.kind == "mps":
        with MpsDaemon():
            result = profile(grid, shares, probe, model, device)
    else:
        result = profile(grid, shares, probe, model, device)
    print(format_report(result))
    if args.out:
        result.table.export(args.out)
        print(f"table written to {args.out}")
    if args.report:
        Path(args.report).write_text(json.dumps({"model": model, "device": device, "shares": shares,
                                                 **result.report()}, indent=2) + "\n")
    url = _store_url(args)
    if url:
        stored = asyncio.run(_with_store(url, lambda s: TuningTable.update(s, args.prefix, result.table.all_points())))
        print(f"tuning table in the store at {keys.tuning_table(args.prefix)}, version {stored.version}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .table import TuningTable

    table = asyncio.run(_with_store(_store_url(args), lambda s: TuningTable.load(s, args.prefix)))
    table.export(args.file)
    print(f"{len(table.all_points())} points, version {table.version}, written to {args.file}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from .table import TuningTable

    try:
        incoming = TuningTable.import_file(args.file)
    except ValueError as exc:
        print(f"elastune tuning import: {exc}", file=sys.stderr)
        return 2

    async def run(store):
        if args.replace:
            current = await TuningTable.load(store, args.prefix)
            incoming.version = max(incoming.version, current.version + 1)
            if not await incoming.save(store, args.prefix):
                raise RuntimeError("the table changed during the import; retry")
            return incoming
        return await TuningTable.update(store, args.prefix, incoming.all_points())

    stored = asyncio.run(_with_store(_store_url(args), run))
    print(f"imported {len(incoming.all_points())} points; the stored table is version {stored.version}")
    return 0


def _split(args: argparse.Namespace) -> int:
    from .selection import best_split
    from .table import TuningTable, nearest_workload

    table = (TuningTable.import_file(args.file) if args.file
             else asyncio.run(_with_store(_store_url(args), lambda s: TuningTable.load(s, args.prefix))))

    def stage_points(stage: str, observed: dict[str, int]):
        rows = [p for p in table.all_points() if p.model == args.model and p.stage == stage and p.device == args.device]
        target = nearest_workload([p.workload for p in rows], observed)
        return [p for p in rows if p.workload == target]

    split = best_split(
        stage_points("prefill", {"prompt_len": args.prompt_len}), stage_points("decode", {"context_len": args.context_len}),
        args.prefill_load, args.decode_load, args.prefill_slo_ms, args.decode_slo_ms,
    )
    if split is None:
        print("no split of one device meets both SLOs at these loads: add devices (the scaler does)")
        return 1
    print(f"prefill share {split.prefill_share:g}, decode share {split.decode_share:g} "
          f"(worst-stage headroom {split.headroom:.2f}x)")
    return 0


def add_commands(sub) -> None:
    """Register `profile` and `tuning` on the top-level subparsers."""
    p = sub.add_parser("profile", help="profile latency/throughput over device shares x runtime settings; find knees")
    p.add_argument("--model", default="", help="Hugging Face model directory (default: the tiny model)")
    p.add_argument("--device", default="cpu", help="cpu (shares: threads + affinity) or cuda[:N] (shares: MPS)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--stages", default="", help="some of prefill,decode,experts (default: prefill,decode, "
                                                "and experts for an MoE model)")
    p.add_argument("--prefill-batches", default="", help="micro-batch sizes, e.g. 1,2,4,8")
    p.add_argument("--prompt-lens", default="", help="prompt lengths, e.g. 32,128")
    p.add_argument("--decode-batches", default="", help="decode batch sizes (= max concurrency), e.g. 1,4,16,64")
    p.add_argument("--context-lens", default="", help="decode context lengths, e.g. 64,256")
    p.add_argument("--experts-micro-batches", default="",
                   help="MoE: expert micro-batch sizes in routed tokens, e.g. 16,64,256,1024")
    p.add_argument("--experts-call-tokens", default="", help="MoE: routed tokens per Forward call, e.g. 256,1024")
    p.add_argument("--shares", default="", help="shares to profile, e.g. 0.3,0.5,1 (default: every thread count, "
                                                "or MPS percentages every --share-step)")
    p.add_argument("--share-step", type=float, default=0.1, help="MPS share grid step")
    p.add_argument("--epsilon", type=float, default=0.05, help="knee: within this fraction of the best throughput")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement")
    p.add_argument("--out", default="", help="write the table as JSON (importable with `elastune tuning import`)")
    p.add_argument("--report", default="", help="write knees and profiling cost as JSON")
    p.add_argument("--store", default="", help="store URL (default: REDIS_URL; none: no store write)")
    p.add_argument("--prefix", default=keys.DEFAULT_PREFIX)
    p.set_defaults(func=_profile)

    t = sub.add_parser("tuning", help="the tuning table: export, import, prefill/decode split")
    tsub = t.add_subparsers(dest="tuning_command", required=True)
    for name, func, help_text in (("export", _export, "write the stored table to FILE"),
                                  ("import", _import, "merge FILE into the stored table")):
        c = tsub.add_parser(name, help=help_text)
        c.add_argument("file")
        c.add_argument("--store", default="")
        c.add_argument("--prefix", default=keys.DEFAULT_PREFIX)
        if name == "import":
            c.add_argument("--replace", action="store_true", help="replace the stored table instead of merging")
        c.set_defaults(func=func)
    s = tsub.add_parser("split", help="best prefill/decode share split of one device for a workload mix")
    s.add_argument("--file", default="", help="a table export (default: the stored table)")
    s.add_argument("--store", default="")
    s.add_argument("--prefix", default=keys.DEFAULT_PREFIX)
    s.add_argument("--model", default="tiny")
    s.add_argument("--device", default="cpu", help="the table's device key (cpu, or the GPU name)")
    s.add_argument("--prefill-load", type=float, required=True, help="prompt tokens/s")
    s.add_argument("--decode-load", type=float, required=True, help="output tokens/s")
    s.add_argument("--prefill-slo-ms", type=float, default=500.0)
    s.add_argument("--decode-slo-ms", type=float, default=100.0)
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--context-len", type=int, default=256)
    s.set_defaults(func=_split)
