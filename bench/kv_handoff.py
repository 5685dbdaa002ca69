"""KV hand-off benchmark: a prompt's KV from a prefill process to a decode process on this host.

1. Hand-off: the KV of a 2,048-token prompt for the Llama-3-8B shape (32 layers x
   [2, 8, 2048, 128] bf16 = 256 MiB, random tensors) goes from a server process to this one by
   each available path: "tcp" (this process listens with `KvTcpServer` and issues a token, the
   server sends the bytes over a plain loopback socket), "grpc" (bytes in the Prefill stream
   over loopback), "shm" (this process offers a shared-memory file, the server writes into it)
   and "cuda_ipc" (this process exports a GPU buffer, the server copies device-to-device; only
   with CUDA). Both sides run the serving code: the server streams with `KvSender` on a real
   grpc.aio server with the workers' channel options, this side reads with `KvReceiver`;
   "handed off" is the time from the call to the last layer readable here, "adopted" adds the
   copy into paged KV blocks (`PagedKvCache.write` on a writer thread, per chunk, as the
   decode worker does).
2. Overlap: a real model's prefill in the server process, its KV streamed layer by layer
   while later layers compute ("stream") against the whole prefill first, then the KV
   ("whole"); time from the call to the KV adopted here, for the tiny shape and a mid-size one.

Prints tables beside the goals and writes JSON with the machine, device and commit.

    python bench/kv_handoff.py                  # everything, 10 repeats
    python bench/kv_handoff.py --repeats 20 --skip-overlap
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

# the repo root instead of bench/ (bench/profile.py would shadow the stdlib module torch imports)
sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.engine import SHAPES  # noqa: E402
from bench.meta import commit, machine, write_json  # noqa: E402
from services.common.kv_cuda_ipc import DeviceBuffer  # noqa: E402
from services.common.kv_tcp import KvTcpServer  # noqa: E402
from services.common.kv_transport import (  # noqa: E402
    CUDA_IPC, GRPC, MAX_CHUNK_BYTES, SHM, TCP, KvLayout, KvReceiver, KvSender, ShmFile, ShmPool, host_id,
    prompt_layout,
)
from services.common.kv_wire import KvChunkData, add_prefill_servicer, prefill_method  # noqa: E402
from services.common.server import GRPC_OPTIONS  # noqa: E402
from services.engine.kv_cache import PagedKvCache  # noqa: E402
from services.engine.model import CausalLM  # noqa: E402
from services.engine.model_config import ModelConfig  # noqa: E402
from services.proto import inference_pb2 as pb  # noqa: E402
from services.proto import inference_pb2_grpc as pb_grpc  # noqa: E402

HANDOFF_SHAPE = "llama3-8b"
HANDOFF_TOKENS = 2048
HANDOFF_BYTES = 256 << 20  # 32 layers x [2, 8, 2048, 128] bf16
BLOCK_SIZE = 16
GOALS = {TCP: "cross-host path >= 1.5 GB/s on loopback", GRPC: "cross-host fallback", SHM: "-",
         CUDA_IPC: "same GPU <= 2 ms"}
# Overlap shapes: what runs in seconds on a 2-core CPU (fp32).
OVERLAP = {
    "tiny": (dict(SHAPES["tiny"]), 512),
    "mid": (dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                 intermediate_size=2048, vocab_size=8192, max_position_embeddings=2048, rope_theta=10000.0), 512),
}


def config_of(shape: dict) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "llama", "rms_norm_eps": 1e-5, **shape})


def random_model(shape: dict) -> CausalLM:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = CausalLM(config_of(shape))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.set_rope_tables(torch.device("cpu"), torch.float32)
    return model.eval()


# ---- server process: the prefill side ----


class BenchPrefill(pb_grpc.PrefillServicer):
    """request_id "handoff:<device>" streams the fixed random layers; "stream:<shape>" and
    "whole:<shape>" run that model's prefill and stream its KV during / after it."""

    def __init__(self, layers: dict[str, list[torch.Tensor]], models: dict[str, CausalLM]):
        self.layers = layers
        self.models = models
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def Prefill(self, request: pb.PrefillRequest, context):
        mode, name = request.request_id.split(":")
        loop = asyncio.get_running_loop()
        target = request.kv_target if request.HasField("kv_target") else None
        if mode == "handoff":
            layers = self.layers[name]
            layout = KvLayout("bfloat16", tuple(layers[0].shape), len(layers))
            sender = KvSender(layout, target, layers[0].device, loop)
            work = loop.run_in_executor(self.executor, _put_all, sender, layers)
        else:
            model = self.models[name]
            cfg = model.config
            tokens = torch.tensor([list(request.prompt_token_ids)])
            layout = prompt_layout(torch.float32, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, tokens.shape[1])
            sender = KvSender(layout, target, torch.device("cpu"), loop)
            work = loop.run_in_executor(self.executor, _prefill, model, tokens, sender, mode == "stream")
        work.add_done_callback(lambda _: sender.end())
        try:
            chunk = await sender.next_chunk()
            yield pb.PrefillChunk(head=pb.PrefillHead(layout=layout.to_proto(), transport=sender.transport))
            while chunk is not None:
                yield chunk
                chunk = await sender.next_chunk()
            compute_ms = await work
            yield pb.PrefillChunk(first=pb.PrefillFirst(token_id=0, compute_ms=compute_ms))
        finally:
            sender.close()


RAW_METHOD = "/bench.Raw/Bytes"


async def _raw_bytes(request: bytes, context):
    """The ceiling for any gRPC path here: the same bytes in the same message sizes, prebuilt,
    no serialization at either end."""
    size = int(request.decode())
    payload = bytes(size)
    for _ in range((HANDOFF_BYTES + size - 1) // size):
        yield payload


def _put_all(sender: KvSender, layers: list[torch.Tensor]) -> float:
    for i, kv in enumerate(layers):
        sender.put(i, kv)
    return 0.0


def _prefill(model: CausalLM, tokens: torch.Tensor, sender: KvSender, stream: bool) -> float:
    """Prefill one prompt; hand each layer's KV [2, KVH, T, D] over as it exists (stream) or after
    the whole forward (whole). Returns the forward's ms."""
    def on_layer(i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        sender.put(i, torch.stack((k[0], v[0])))

    start = time.perf_counter()
    if stream:
        model.prefill(tokens, torch.tensor([tokens.shape[1]]), on_layer)
        return (time.perf_counter() - start) * 1000
    _, kv = model.prefill(tokens, torch.tensor([tokens.shape[1]]))
    ms = (time.perf_counter() - start) * 1000
    for i, (k, v) in enumerate(kv):
        on_layer(i, k, v)
    return ms


async def serve(args) -> None:
    shape = SHAPES[HANDOFF_SHAPE]
    kvh, d = shape["num_key_value_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    g = torch.Generator().manual_seed(0)
    cpu = [torch.randn(2, kvh, HANDOFF_TOKENS, d, generator=g).to(torch.bfloat16)
           for _ in range(shape["num_hidden_layers"])]
    layers = {"cpu": cpu}
    if torch.cuda.is_available():
        layers["cuda"] = [t.cuda() for t in cpu]
    models = {} if args.skip_overlap else {name: random_model(s) for name, (s, _) in OVERLAP.items()}
    server = grpc.aio.server(options=GRPC_OPTIONS)
    add_prefill_servicer(BenchPrefill(layers, models), server)
    raw = {"Bytes": grpc.unary_stream_rpc_method_handler(_raw_bytes)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Raw", raw),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"PORT {port}", flush=True)
    await server.wait_for_termination()


# ---- this process: the decode side ----


class Receiver:
    """Offers the buffer a path needs, reads the stream, optionally adopts into paged blocks."""

    def __init__(self, prefill, cfg: ModelConfig, dtype: torch.dtype, device: torch.device, tokens: int,
                 reuse_shm: bool = True):
        self.prefill = prefill
        self.pool = ShmPool() if reuse_shm else None  # as the decode worker does
        self.tcp = KvTcpServer("127.0.0.1")  # its buffers are pooled too
        self.tcp.start()
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-write")
        self.cfg = cfg
        self.tokens = tokens
        blocks = -(-tokens // BLOCK_SIZE)
        self.cache = PagedKvCache(cfg, blocks, BLOCK_SIZE, dtype, device)
        self.table = list(range(blocks))
        self.bytes = cfg.kv_bytes_per_token(torch.empty(0, dtype=dtype).element_size()) * tokens

    async def once(self, request_id: str, path: str, adopt: bool) -> tuple[float, str, float]:
        """(ms from the call to the KV readable / adopted here, transport, the server's forward ms)."""
        buffer = None
        inbox = None
        target = pb.KvTarget()
        if path == TCP:
            inbox = self.tcp.expect(self.bytes, (2, self.cfg.num_kv_heads, self.tokens, self.cfg.head_dim),
                                    self.cfg.num_layers)
            target = pb.KvTarget(tcp_address=f"127.0.0.1:{self.tcp.port}", tcp_token=inbox.token)
        elif path == SHM:
            buffer = self.pool.take(self.bytes, tag="bench") if self.pool else ShmFile.create(self.bytes, tag="bench")
            target = pb.KvTarget(host_id=host_id(), shm_path=str(buffer.path), shm_bytes=buffer.size)
        elif path == CUDA_IPC:
            buffer = DeviceBuffer.allocate(self.bytes, self.cache.device)
            target.cuda_ipc.CopyFrom(buffer.export())
        request = pb.PrefillRequest(request_id=request_id, prompt_token_ids=[1] * self.tokens, kv_target=target)
        try:
            start = time.perf_counter()
            receiver = None
            compute_ms = 0.0
            async for msg in self.prefill(request):
                kind = "kv" if isinstance(msg, KvChunkData) else msg.WhichOneof("kind")
                if kind == "head":
                    offered = inbox if msg.head.transport == TCP else buffer
                    receiver = KvReceiver(KvLayout.from_proto(msg.head.layout), msg.head.transport, offered)
                elif kind == "kv":
                    if receiver.transport == TCP:
                        await inbox.until(msg.layer_end, 30.0)
                    layers = list(receiver.layers(msg))
                    if adopt:
                        await asyncio.get_running_loop().run_in_executor(self.writer, self._write, layers)
                else:
                    compute_ms = msg.first.compute_ms
            if self.cache.device.type == "cuda":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - start) * 1000
            assert receiver is not None and receiver.complete
            if path == SHM and self.pool:
                self.pool.give_back(buffer)
                buffer = None
            return ms, receiver.transport, compute_ms
        finally:
            if buffer is not None:
                buffer.unlink()
            if inbox is not None:
                inbox.close()

    def _write(self, layers) -> None:
        for layer, kv in layers:
            self.cache.write(layer, self.table, kv)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.tcp.stop()
        self.writer.shutdown()


def p50(values: list[float]) -> float:
    return statistics.median(values)


async def handoff_rows(stub, repeats: int) -> list[dict]:
    cfg = config_of(SHAPES[HANDOFF_SHAPE])
    paths = [(TCP, "cpu", True), (GRPC, "cpu", True), (SHM, "cpu", True), (SHM, "cpu", False)]
    paths += [(CUDA_IPC, "cuda", True)] if torch.cuda.is_available() else []
    rows = []
    for path, device, reuse in paths:
        recv = Receiver(stub, cfg, torch.bfloat16, torch.device(device), HANDOFF_TOKENS, reuse_shm=reuse)
        for adopt in (False, True):
            await recv.once(f"handoff:{device}", path, adopt)  # warm-up
            times = []
            for _ in range(repeats):
                ms, transport, _ = await recv.once(f"handoff:{device}", path, adopt)
                assert transport == path, f"asked for {path}, the server chose {transport}"
                times.append(ms)
            key = "adopted" if adopt else "handed_off"
            if not adopt:
                name = path if reuse or path != SHM else "shm, new file"
                rows.append({"path": name, "bytes": recv.bytes, "goal": GOALS[path]})
            rows[-1][f"{key}_ms_p50"] = p50(times)
            rows[-1][f"{key}_ms_all"] = times
            rows[-1][f"{key}_gb_s"] = recv.bytes / (p50(times) / 1000) / 1e9
        recv.close()
    return rows


async def raw_grpc_row(channel, repeats: int) -> dict:
    call = channel.unary_stream(RAW_METHOD)
    size = HANDOFF_BYTES // SHAPES[HANDOFF_SHAPE]["num_hidden_layers"]  # one layer per message, as the KV path
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        async for _ in call(str(size).encode()):
            pass
        if i:  # the first is warm-up
            times.append((time.perf_counter() - start) * 1000)
    return {"path": "raw grpc bytes", "bytes": HANDOFF_BYTES, "handed_off_ms_p50": p50(times),
            "handed_off_ms_all": times, "handed_off_gb_s": HANDOFF_BYTES / (p50(times) / 1000) / 1e9,
            "adopted_ms_p50": float("nan"), "adopted_gb_s": float("nan"), "goal": "ceiling for grpc, same box, same run"}


async def overlap_rows(stub, repeats: int) -> list[dict]:
    rows = []
    for name, (shape, tokens) in OVERLAP.items():
        cfg = config_of(shape)
        recv = Receiver(stub, cfg, torch.float32, torch.device("cpu"), tokens)
        for path in (TCP, GRPC, SHM):
            row = {"shape": name, "tokens": tokens, "path": path, "bytes": recv.bytes}
            for mode in ("whole", "stream", "whole", "stream"):  # warm-up, then alternate
                await recv.once(f"{mode}:{name}", path, adopt=True)
            times = {"whole": [], "stream": []}
            tails = {"whole": [], "stream": []}
            for _ in range(repeats):
                for mode in ("whole", "stream"):
                    ms, _, compute_ms = await recv.once(f"{mode}:{name}", path, adopt=True)
                    times[mode].append(ms)
                    tails[mode].append(ms - compute_ms)  # what the hand-off adds after the forward
            for mode in times:
                row[f"{mode}_ms_p50"] = p50(times[mode])
                row[f"{mode}_ms_all"] = times[mode]
                row[f"{mode}_tail_ms_p50"] = p50(tails[mode])
                row[f"{mode}_tail_ms_all"] = tails[mode]
            row["saved_ms"] = row["whole_ms_p50"] - row["stream_ms_p50"]
            row["saved_tail_ms"] = row["whole_tail_ms_p50"] - row["stream_tail_ms_p50"]
            rows.append(row)
        recv.close()
    return rows


async def run(args) -> dict:
    cmd = [sys.executable, __file__, "--serve", "--threads", str(args.threads)] + (
        ["--skip-overlap"] if args.skip_overlap else [])
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = await asyncio.to_thread(server.stdout.readline)
        if not line.startswith("PORT "):
            raise RuntimeError(f"server process did not start (said {line!r})")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{line.split()[1]}", options=GRPC_OPTIONS) as channel:
            stub = prefill_method(channel)
            handoff = await handoff_rows(stub, args.repeats)
            handoff.append(await raw_grpc_row(channel, args.repeats))
            overlap = [] if args.skip_overlap else await overlap_rows(stub, max(3, args.repeats // 2))
    finally:
        server.terminate()
        server.wait(timeout=10)
    return {"handoff": handoff, "overlap": overlap}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-overlap", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each process (2 processes, 2 cores)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.serve:
        asyncio.run(serve(args))
        return
    load_before = os.getloadavg()
    rows = asyncio.run(run(args))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result = {"machine": machine(), "device": device, "torch": torch.__version__, "commit": commit(),
              "max_chunk_bytes": MAX_CHUNK_BYTES, "repeats": args.repeats, "threads": args.threads,
              "load_avg_before": load_before, "load_avg_after": os.getloadavg(), **rows}
    print(f"\nKV hand-off, {HANDOFF_SHAPE} shape, {HANDOFF_TOKENS} tokens, bf16, two processes on {device}, "
          f"commit {result['commit']} (p50 of {args.repeats}; load average {load_before[0]:.1f} before, "
          f"{result['load_avg_after'][0]:.1f} after)")
    print(f"{'path':<15} {'MiB':>5} {'handed off ms':>14} {'GB/s':>6} {'adopted ms':>11} {'GB/s':>6}  goal")
    for r in result["handoff"]:
        print(f"{r['path']:<15} {r['bytes'] / 2**20:>5.0f} {r['handed_off_ms_p50']:>14.1f} {r['handed_off_gb_s']:>6.2f} "
              f"{r['adopted_ms_p50']:>11.1f} {r['adopted_gb_s']:>6.2f}  {r['goal']}")
    if result["overlap"]:
        print("\nPrefill start -> KV adopted: streamed per layer vs after the whole prefill (fp32, CPU)")
        print("(tail = end to end minus the server's forward: what the hand-off adds after the last layer)")
        print(f"{'shape':<6} {'tokens':>6} {'path':<5} {'MiB':>6} {'whole ms':>9} {'stream ms':>10} {'saved ms':>9}"
              f" {'whole tail':>11} {'stream tail':>12} {'saved tail':>11}")
        for r in result["overlap"]:
            print(f"{r['shape']:<6} {r['tokens']:>6} {r['path']:<5} {r['bytes'] / 2**20:>6.1f} {r['whole_ms_p50']:>9.1f} "
                  f"{r['stream_ms_p50']:>10.1f} {r['saved_ms']:>9.1f} {r['whole_tail_ms_p50']:>11.1f} "
                  f"{r['stream_tail_ms_p50']:>12.1f} {r['saved_tail_ms']:>11.1f}")
    write_json(Path(args.out) / f"kv_handoff-{'cuda' if torch.cuda.is_available() else 'cpu'}-{result['commit']}.json", result)


if __name__ == "__main__":
    main()
