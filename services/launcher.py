"""`elastune up`: the whole pipeline on one machine, each stage in its own process.

Starts the store (embedded Valkey unless REDIS_URL is set), N prefill and N decode workers
and the gateway; waits until the gateway sees every worker; prints the endpoint. SIGINT or
SIGTERM stops every process it started: workers drain, then the store goes.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .engine.tiny import ensure_tiny_model

REPO = Path(__file__).resolve().parents[1]


@dataclass
class UpOptions:
    model: str = ""
    prefill: int = 1
    decode: int = 1
    port: int = 8000
    host: str = "127.0.0.1"
    threads: int = 0  # torch threads per worker; 0: cores / workers
    ready_timeout_s: float = 180.0
    stop_grace_s: float = 20.0
    autoscale: bool = False  # run the scaler and the local autoscaler (KEDA + HPA) on the ScaledObjects
    scaledobjects: str = ""  # folder of ScaledObject YAML; empty: k8s/local (tiny model on CPU)
    events: str = ""  # append scaling events here as JSON lines
    cold_start_wait_s: float = 60.0  # with --autoscale: how long the gateway holds a request at zero decode workers
    tune: bool = False  # one tuner sidecar per worker (services/tuner/sidecar.py), fed by the tuning table
    experts: int = -1  # MoE models: expert groups served by experts processes (0: experts inside the workers; -1: 2 for an MoE model)


class Stack:
    """The processes of one local deployment; also the autoscaler's scale target
    (`current`, `ready`, `scale`: the ReplicaController of services/autoscaler/local.py)."""

    def __init__(self, opts: UpOptions):
        self.opts = opts
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.retiring: list[tuple[str, subprocess.Popen]] = []  # SIGTERM'd workers, draining
        self.store: subprocess.Popen | None = None
        self.store_url = os.environ.get("REDIS_URL", "")
        self.model_dir = ""
        self.worker_env: dict[str, str] = {}
        self.autoscaling: Autoscaling | None = None
        self.ready_counts: dict[str, int] = {}
        self.tuners: list[tuple[subprocess.Popen, subprocess.Popen]] = []  # (worker, its sidecar), with --tune
        self._lock = threading.Lock()

    def _spawn(self, role: str, env: dict[str, str]) -> None:
        tuned = self.opts.tune and (role in ("prefill", "decode") or role.startswith("experts/"))
        if tuned:  # the sidecar must know where its worker listens
            env = {**env, "ELASTUNE_PORT": str(free_port())}
        full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
        command = role
        if role.startswith("experts/"):  # an expert group's server: stage experts/<group>
            command, full_env["ELASTUNE_EXPERT_GROUP"] = "experts", role.split("/", 1)[1]
            full_env.pop("ELASTUNE_EXPERTS", None)
        # Own sessions: a terminal's Ctrl-C reaches only this launcher, which stops the
        # stack in order (gateway, then draining workers, then the store).
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "serve", command], env=full_env, start_new_session=True
        )
        with self._lock:
            self.procs.append((role, proc))
        if tuned:
            tuner_env = {**full_env, "ELASTUNE_WORKER": f"{self.opts.host}:{env['ELASTUNE_PORT']}"}
            tuner_env.pop("ELASTUNE_PORT")
            tuner = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "tuner"], env=tuner_env,
                                     start_new_session=True)
            with self._lock:
                self.tuners.append((proc, tuner))

    def _stop_tuners(self, everyone: bool = False) -> None:
        """SIGTERM the sidecars whose worker exited (or all of them)."""
        with self._lock:
            done = [(w, t) for w, t in self.tuners if everyone or w.poll() is not None]
            self.tuners = [pair for pair in self.tuners if pair not in done]
        for _, tuner in done:
            if tuner.poll() is None:
                tuner.send_signal(signal.SIGTERM)
        for _, tuner in done:
            try:
                tuner.wait(timeout=10)
            except subprocess.TimeoutExpired:
                tuner.kill()

    # ---- ReplicaController ----

    def current(self, role: str) -> int:
        with self._lock:
            return sum(1 for r, p in self.procs if r == role and p.poll() is None)

    def ready(self, role: str) -> int:
        """Workers of the role that report in the store and are not draining, as last read by
        Autoscaling's directory task (the autoscaler's loop must not block on the store)."""
        return self.ready_counts.get(role, 0)

    async def scale(self, role: str, replicas: int) -> None:
        """Start workers, or SIGTERM the newest first (they drain and hand work over)."""
        with self._lock:
            live = [(r, p) for r, p in self.procs if r == role and p.poll() is None]
        for _ in range(replicas - len(live)):
            self._spawn(role, self.worker_env)
        for entry in reversed(live[replicas:] if replicas < len(live) else []):
            entry[1].send_signal(signal.SIGTERM)
            with self._lock:
                self.procs.remove(entry)
                self.retiring.append(entry)

    def _start_store(self) -> str:
        self.store = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "store"], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        url = self.store.stdout.readline().strip()
        if not url.startswith("redis://"):
            raise RuntimeError(f"the embedded store did not start (exit code {self.store.poll()})")
        return url

    def start(self) -> None:
        o = self.opts
        self.model_dir = _model_dir(o.model)
        if not self.store_url:
            self.store_url = self._start_store()
        groups = expert_groups(self.model_dir, o.experts)
        workers = o.prefill + o.decode + len(groups)
        threads = o.threads or max(1, (os.cpu_count() or 2) // max(workers, 1))
        common = {"ELASTUNE_MODEL_DIR": self.model_dir, "REDIS_URL": self.store_url, "ELASTUNE_HOST": o.host}
        self.worker_env = {**common, "ELASTUNE_THREADS": str(threads)}
        if o.tune:  # workers report their CPU share, which the sidecars and the scaler look up
            self.worker_env["ELASTUNE_GPU_SHARE"] = f"{min(1.0, threads / (os.cpu_count() or 1)):g}"
        if groups:  # experts first: prefill and decode wait for every group before they register
            self.worker_env.update(ELASTUNE_EXPERTS="remote", ELASTUNE_NUM_GROUPS=str(len(groups)))
            for group in groups:
                self._spawn(f"experts/{group}", self.worker_env)
        for _ in range(o.prefill):
            self._spawn("prefill", self.worker_env)
        for _ in range(o.decode):
            self._spawn("decode", self.worker_env)
        gateway_env = {**common, "ELASTUNE_HTTP_PORT": str(o.port)}
        if o.autoscale:
            gateway_env["ELASTUNE_COLD_START_WAIT_S"] = str(o.cold_start_wait_s)
            self.autoscaling = Autoscaling(self, o.scaledobjects or str(REPO / "k8s" / "local"), o.events, groups)
            self.autoscaling.start()
        self._spawn("gateway", gateway_env)

    @property
    def base_url(self) -> str:
        return f"http://{self.opts.host}:{self.opts.port}"

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.ready_timeout_s
        want = {"prefill": self.opts.prefill, "decode": self.opts.decode}
        while time.monotonic() < deadline:
            for role, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{role} process exited with code {proc.returncode} during start-up")
            try:
                with urllib.request.urlopen(self.base_url + "/health", timeout=2) as resp:
                    workers = json.loads(resp.read())["workers"]
            except Exception:  # not up yet, or 503 until workers register
                workers = {}
            if all(workers.get(stage, 0) >= n for stage, n in want.items()):
                return
            time.sleep(0.3)
        raise TimeoutError(f"the stack was not ready within {self.opts.ready_timeout_s:.0f} s")

    def reap(self) -> list[tuple[str, int]]:
        """Forget processes that exited: (role, exit code) of those that were not asked to stop."""
        with self._lock:
            self.retiring = [(r, p) for r, p in self.retiring if p.poll() is None]
            gone = [(r, p) for r, p in self.procs if p.poll() is not None]
            for entry in gone:
                self.procs.remove(entry)
        self._stop_tuners()
        return [(r, p.returncode) for r, p in gone]

    def stop(self) -> None:
        if self.autoscaling is not None:
            self.autoscaling.stop()  # first, so nothing is started while the stack goes down
        # The gateway first (no new requests), then workers drain, then the store.
        for role, proc in sorted(self.procs, key=lambda rp: rp[0] != "gateway"):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.opts.stop_grace_s
        for _, proc in self.procs + self.retiring:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stop_tuners(everyone=True)
        if self.store is not None:
            self.store.terminate()
            self.store.wait(timeout=10)

    def banner(self) -> str:
        o = self.opts
        body = json.dumps({"model": Path(self.model_dir).name, "prompt": "Hello", "max_tokens": 16})
        groups = expert_groups(self.model_dir, o.experts)
        experts = f" + {len(groups)} expert groups" if groups else ""
        return (
            f"elastune is serving {self.model_dir}\n"
            f"  {o.prefill} prefill + {o.decode} decode workers{experts}, store {self.store_url}\n"
            f"  OpenAI API: {self.base_url}/v1\n"
            f"  try: curl -s {self.base_url}/v1/completions -H 'Content-Type: application/json' -d '{body}'\n"
            f"  Ctrl-C stops everything."
        )


def run_up(opts: UpOptions) -> int:
    stack = Stack(opts)
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        stack.start()
        stack.wait_ready()
        print(stack.banner(), flush=True)
        while not stopping:
            for role, code in stack.reap():
                print(f"elastune: {role} process exited with code {code}", file=sys.stderr, flush=True)
                if role == "gateway":
                    return 1
            time.sleep(0.2)
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"elastune: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stack.stop()


class Autoscaling:
    """`--autoscale`: the scaler process, and the local autoscaler on a thread of its own that
    polls it exactly as KEDA does and scales the stack's worker processes."""

    def __init__(self, stack: Stack, scaledobjects_dir: str, events_path: str, expert_groups: list[str] = ()):
        from .autoscaler.scaledobject import load_dir

        self.stack = stack
        self.objects = load_dir(scaledobjects_dir)
        if expert_groups:  # one ScaledObject per expert group that runs (k8s/local-experts)
            wanted = {f"experts/{g}" for g in expert_groups}
            self.objects += [so for so in load_dir(REPO / "k8s" / "local-experts") if so.stage in wanted]
        if not self.objects:
            raise RuntimeError(f"no ScaledObject in {scaledobjects_dir}")
        self.events_path = events_path or None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._autoscaler = None
        self._thread = threading.Thread(target=self._run, name="autoscaler", daemon=True)

    def start(self) -> None:
        port = free_port()
        self.stack._spawn("scaler", {**self.stack.worker_env, "ELASTUNE_PORT": str(port)})
        self.scaler_address = f"127.0.0.1:{port}"
        self._thread.start()

    def _run(self) -> None:
        from .autoscaler.local import LocalAutoscaler
        from .autoscaler.scaledobject import scaler_addresses
        from .common import keys
        from .common.registry import WorkerDirectory
        from .common.store import connect
        from .common.tasks import spawn

        async def main() -> None:
            await _wait_for_port(self.scaler_address, timeout_s=60)
            store = connect(self.stack.store_url)
            directory = spawn(self._count_ready(WorkerDirectory(store, keys.DEFAULT_PREFIX)), name="launcher.ready")
            self._autoscaler = LocalAutoscaler(
                self.objects, self.stack,
                address_override={a: self.scaler_address for a in scaler_addresses(self.objects)},
                store=store, events_path=self.events_path,
            )
            try:
                await self._autoscaler.run()
            finally:
                directory.cancel()
                await store.aclose()

        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(main())

    async def _count_ready(self, directory) -> None:
        from .common.tasks import raise_if_cancelling

        stages = {so.stage for so in self.objects}
        while True:
            try:
                for stage in stages:
                    self.stack.ready_counts[stage] = sum(not w.draining for w in await directory.workers(stage))
            except Exception as exc:  # store down: keep the last counts
                raise_if_cancelling(exc)
                print(f"elastune: cannot read workers from the store: {exc}", file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        if self._loop is not None and self._autoscaler is not None:
            asyncio.run_coroutine_threadsafe(self._autoscaler.stop(), self._loop).result(10)
        self._thread.join(timeout=10)


def _model_dir(model: str) -> str:
    """--model: a directory, "tiny-moe" (the tiny MoE model, created on first use), or empty (tiny)."""
    if model == "tiny-moe":
        from .engine.tiny_moe import ensure_tiny_moe_model

        return str(ensure_tiny_moe_model())
    return str(Path(model).resolve()) if model else str(ensure_tiny_model())


def expert_groups(model_dir: str, requested: int) -> list[str]:
    """Groups g0.. of experts servers to start: none for a dense model or with 0 (colocated)."""
    from .engine.moe_config import MoeConfig, is_moe_dir

    if requested == 0 or not is_moe_dir(model_dir):
        return []
    num_experts = MoeConfig.from_dir(model_dir).num_experts
    count = 2 if requested < 0 else requested
    if not 1 <= count <= num_experts:
        raise RuntimeError(f"--experts must be in 0..{num_experts} (the model's expert count), got {requested}")
    return [f"g{i}" for i in range(count)]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A port that is free now and that the OS will not hand out on its own later.

    The port is given to a process that binds it seconds from now. A port from the ephemeral
    range (what binding port 0 returns) may be taken meanwhile by any socket bound to port 0 or
    any outgoing connection (other workers start in between), so pick below that range.
    """
    low, _ = _ephemeral_range()
    rng = random.SystemRandom()
    for _ in range(64):
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a crowded host: fall back to what the OS offers
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait_for_port(address: str, timeout_s: float) -> None:
    """Until something accepts connections at host:port (the scaler process starting up)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.2)
