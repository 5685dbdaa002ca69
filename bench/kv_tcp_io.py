"""Raw loopback TCP: which receive style moves 256 MiB fastest into a preallocated buffer.

The KV "tcp" path (services/common/kv_tcp.py) could read its socket on a dedicated thread
(blocking `recv_into`, the GIL released during the copy) or on the event loop (an
`asyncio.BufferedProtocol` whose `get_buffer` hands out the destination memory, or
`loop.sock_recv_into`). A sender process writes 8 MiB pieces with `sendall` from one
preallocated buffer; this process receives each style in turn. p50 over repeats, after a
warm-up; prints a table and writes JSON with the machine and commit.

    python bench/kv_tcp_io.py --repeats 10
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.meta import commit, machine, write_json  # noqa: E402

TOTAL = 256 << 20
PIECE = 8 << 20  # one Llama-3-8B layer of a 2,048-token prompt
STYLES = ("thread recv_into", "asyncio BufferedProtocol", "asyncio sock_recv_into")


def serve() -> None:
    """Sender: every accepted connection gets TOTAL bytes in PIECE-sized sendall calls."""
    payload = memoryview(bytearray(os.urandom(1 << 20)) * (PIECE >> 20))
    with socket.create_server(("127.0.0.1", 0)) as srv:
        print(f"PORT {srv.getsockname()[1]}", flush=True)
        while True:
            conn, _ = srv.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for _ in range(TOTAL // PIECE):
                    conn.sendall(payload)


def recv_thread(port: int, buf: memoryview) -> None:
    def work():
        with socket.create_connection(("127.0.0.1", port)) as sock:
            got = 0
            while got < TOTAL:
                n = sock.recv_into(buf[got:], TOTAL - got)
                if not n:
                    raise ConnectionError("sender closed early")
                got += n

    t = threading.Thread(target=work)
    t.start()
    t.join()


class _Into(asyncio.BufferedProtocol):
    def __init__(self, buf: memoryview, done: asyncio.Future):
        self.buf, self.got, self.done = buf, 0, done

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buf[self.got:]

    def buffer_updated(self, nbytes: int) -> None:
        self.got += nbytes
        if self.got == TOTAL and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("sender closed early"))


async def recv_protocol(port: int, buf: memoryview) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, _ = await loop.create_connection(lambda: _Into(buf, done), "127.0.0.1", port)
    try:
        await done
    finally:
        transport.close()


async def recv_sock(port: int, buf: memoryview) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setblocking(False)
    try:
        got = 0
        while got < TOTAL:
            n = await loop.sock_recv_into(sock, buf[got:])
            if not n:
                raise ConnectionError("sender closed early")
            got += n
    finally:
        sock.close()


async def measure(port: int, repeats: int) -> list[dict]:
    buf = memoryview(bytearray(TOTAL))  # touched once by the warm-up, as a pooled buffer is
    rows = []
    for style in STYLES:
        times = []
        for i in range(repeats + 1):
            start = time.perf_counter()
            if style == STYLES[0]:
                await asyncio.to_thread(recv_thread, port, buf)
            elif style == STYLES[1]:
                await recv_protocol(port, buf)
            else:
                await recv_sock(port, buf)
            if i:
                times.append((time.perf_counter() - start) * 1000)
        ms = statistics.median(times)
        rows.append({"style": style, "ms_p50": ms, "ms_all": times, "gb_s": TOTAL / (ms / 1000) / 1e9})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.serve:
        serve()
        return
    server = subprocess.Popen([sys.executable, __file__, "--serve"], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline().split()[1])
        load = os.getloadavg()
        rows = asyncio.run(measure(port, args.repeats))
    finally:
        server.terminate()
        server.wait(timeout=10)
    result = {"machine": machine(), "device": "cpu", "commit": commit(), "repeats": args.repeats,
              "load_avg_before": load, "load_avg_after": os.getloadavg(), "rows": rows}
    print(f"\nloopback TCP, {TOTAL >> 20} MiB per transfer, commit {result['commit']}, p50 of {args.repeats} "
          f"(load average {load[0]:.1f} before, {result['load_avg_after'][0]:.1f} after)")
    print(f"{'receiver':<26} {'ms':>8} {'GB/s':>6}")
    for r in rows:
        print(f"{r['style']:<26} {r['ms_p50']:>8.1f} {r['gb_s']:>6.2f}")
    write_json(Path(args.out) / f"kv_tcp_io-cpu-{result['commit']}.json", result)


if __name__ == "__main__":
    main()
