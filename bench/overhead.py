"""What one hop through the gateway costs, against the floor and against a peer.

One workload - many tenants, each with a long system prompt and multi-turn sessions,
20-80 KB prompts, half of them streamed - is sent closed loop at each concurrency, the
same request sequence every time:

    direct          straight to the provider emulator (the client picks the account key
                    by tenant: ideal static affinity, so the baseline is never a cache miss
                    the gateway would have avoided)
    nginx           one bare reverse-proxy hop (bench/peers/nginx.conf): the physical floor
    python-raw      one asyncio process with httptools on both sides, no ASGI server and no
                    HTTP client library (bench/peers/raw_relay.py): the floor of a Python hop
    uvicorn+raw     halves of the next row, run only when --rows names them: uvicorn with a
    raw+aiohttp     raw httptools client (bench/peers/uvicorn_raw.py), and an aiohttp session
                    behind a raw httptools server (bench/peers/raw_aiohttp.py)
    asgi-floor      uvicorn + one aiohttp session, no middleware (bench/peers/asgi_floor.py):
                    the floor of the gateway's own stack
    gateway         `affinity-gateway serve`, embedded state, one worker
    gateway+redis   the same with `state.redis_url` on a redis-server of its own
    litellm         the LiteLLM proxy (bench/peers/litellm.yaml) in a separate virtualenv

Every server runs in a process of its own on 127.0.0.1; the client is this process. Each
measurement starts a fresh emulator (cold caches) and a fresh proxy, so rows differ only
in the hop. A proxy's CPU time is read from /proc before and after the run, so CPU per
request holds up on a busy machine where wall-clock latencies do not.

    .venv/bin/python -m bench.overhead [--requests N] [--concurrency 4,32] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.util
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
import yaml

from gateway.presets import DEMO_KEY, emulated_config
from gateway.table import render
from gateway.workload import multi_tenant

PEERS = Path(__file__).parent / "peers"
ROOT = Path(__file__).resolve().parent.parent
ROWS = (
    "direct",
    "nginx",
    "python-raw",
    "uvicorn+raw",
    "raw+aiohttp",
    "asgi-floor",
    "gateway",
    "gateway+redis",
    "litellm",
)
# Rows run only when --rows names them: halves of the asgi-floor hop.
OPT_IN = ("uvicorn+raw", "raw+aiohttp")
DEFAULT_ROWS = tuple(r for r in ROWS if r not in OPT_IN)
# The rows that are a script in bench/peers.
PYTHON_PEERS = {
    "python-raw": "raw_relay.py",
    "uvicorn+raw": "uvicorn_raw.py",
    "raw+aiohttp": "raw_aiohttp.py",
    "asgi-floor": "asgi_floor.py",
}
HOST = "127.0.0.1"

# The emulated provider's latency. "paced": a provider that answers at the pace of the
# reference point (direct calls at ~165 req/s at concurrency 32 on a 2-core machine):
# 20 ms base, 4 ms per 1k uncached prompt tokens, 200 output tokens/s; still far faster
# than a real model. "fast": a small fixed latency, so that a proxy's own cost - and its
# ceiling on one core - shows.
PROVIDERS: dict[str, dict[str, float]] = {
    "paced": {"base_ms": 20.0, "prefill_ms_per_1k_uncached": 4.0, "decode_ms_per_token": 5.0},
    "fast": {"base_ms": 5.0, "prefill_ms_per_1k_uncached": 0.02, "decode_ms_per_token": 0.2},
}
OUTPUT_TOKENS = 32
SYSTEM_WORDS = (2800, 11400)  # with the history: prompts of 20-80 KB
ANTHROPIC_SHARE = 0.25
SESSIONS_PER_APP = 3
TURNS = 4
WARMUP_REQUESTS = 16  # at least; and two per worker, so every pool is warm at the run's width
LITELLM_KEY = "sk-bench-litellm"
ANTHROPIC_VERSION = "2023-06-01"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the workload ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    path: str  # /v1/chat/completions or /v1/messages
    body: bytes
    stream: bool
    tenant: int


ANSWERS = ("mixed", "streamed", "json")


def workload(requests: int, seed: int = 7, answers: str = "mixed") -> list[Request]:
    """The first ``requests`` calls of a multi-tenant workload, in arrival order.

    ``answers`` keeps only the streamed or only the JSON calls of a longer sequence
    (the same tenants and prompts), to tell a request's fixed cost from its cost per
    relayed event. Built once per arguments (a run asks for it to send, describe and
    report)."""
    return list(_workload(requests, seed, answers))


@functools.cache
def _workload(requests: int, seed: int, answers: str) -> tuple[Request, ...]:
    if answers != "mixed":
        streamed = answers == "streamed"
        keep = [r for r in _workload(4 * requests, seed, "mixed") if r.stream is streamed]
        if len(keep) < requests:
            raise ValueError(f"only {len(keep)} {answers} calls among {4 * requests}")
        return tuple(keep[:requests])
    apps = max(1, math.ceil(requests / (SESSIONS_PER_APP * TURNS)))
    calls = multi_tenant(
        apps=apps,
        sessions_per_app=SESSIONS_PER_APP,
        turns=TURNS,
        system_words=SYSTEM_WORDS,
        anthropic_share=ANTHROPIC_SHARE,
        stream_share=0.5,
        seed=seed,
    )[:requests]
    out = []
    for call in calls:
        body = orjson.loads(call.body)
        body["max_tokens"] = OUTPUT_TOKENS
        tenant = int(call.session.split("-", 1)[0])
        out.append(Request(call.path, orjson.dumps(body), call.stream, tenant))
    return tuple(out)


def warmup_requests(count: int) -> list[Request]:
    """Short prompts (below any cache minimum): they open connections, touch no cache."""
    out = []
    for i in range(count):
        stream = i % 2 == 1
        if i % 4 == 3:
            body: dict[str, Any] = {
                "model": "claude-sonnet-4-6",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"warm up {i}"}],
            }
            path = "/v1/messages"
        else:
            body = {
                "model": "gpt-4o-mini",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": f"warm up {i}"}],
            }
            path = "/v1/chat/completions"
        if stream:
            body["stream"] = True
        out.append(Request(path, orjson.dumps(body), stream, i))
    return out


# --- processes ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2 :].split()  # fields from 3 (state) on


def process_tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = _stat_fields(int(entry.name))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: Sequence[int], *, system_only: bool = False) -> float:
    """User + system (or only system: in the kernel) CPU time of the processes, in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            ticks += int(fields[12]) if system_only else int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss(pids: Sequence[int]) -> int:
    """Sum of the processes' peak resident set sizes (VmHWM), in bytes."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1]) * 1024
    return total


class Service:
    """A server in a process group of its own; its output goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        workdir: Path,
        ready: Callable[[], bool],
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = workdir / f"{name}.log"
        self.ready = ready
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 60.0) -> None:
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self.ready():
                return
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s: {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self) -> None:
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)  # the group this Service made
                    proc.wait(5)
            # Workers that outlived their parent (nginx, uvicorn) are in the same group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def _http_ok(url: str, headers: dict[str, str] | None = None) -> Callable[[], bool]:
    import urllib.error
    import urllib.request

    def check() -> bool:
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:
                return int(r.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    return check


def _get_json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as r:
        return orjson.loads(r.read())


def _post(url: str) -> None:
    import urllib.request

    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=5):
        pass


def start_emulator(workdir: Path, accounts: int, provider: str) -> tuple[Service, str]:
    config = workdir / "emulator.yaml"
    emulator = {
        "accounts": accounts,
        "seed": 1,
        "latency": PROVIDERS[provider],
        "default_output_tokens": OUTPUT_TOKENS,
    }
    config.write_text(yaml.safe_dump(emulator))
    port = free_port()
    url = f"http://{HOST}:{port}"
    service = Service(
        "emulator",
        [
            *(sys.executable, "-m", "gateway", "--log-level", "warning", "emulate"),
            *("--config", str(config), "--host", HOST, "--port", str(port)),
        ],
        workdir=workdir,
        ready=_http_ok(url + "/stats"),
        cwd=ROOT,
    )
    service.start()
    return service, url


# --- the proxies ----------------------------------------------------------------------


class Unavailable(Exception):
    """A row that cannot run here; the message says why and goes in the table."""


@dataclass(slots=True)
class Hop:
    """A started proxy (or none, for the direct row) and how to call it."""

    url: str
    key: Callable[[Request], str]
    services: list[Service] = field(default_factory=list)
    measured: Service | None = None  # the proxy whose CPU and memory count
    aux: Service | None = None  # a helper whose CPU is reported apart (redis-server)

    def stop(self) -> None:
        for service in reversed(self.services):
            service.stop()


def _direct_key(accounts: int) -> Callable[[Request], str]:
    return lambda r: f"sk-emu-{r.tenant % accounts}"


def start_nginx(workdir: Path, emulator_url: str, accounts: int) -> Hop:
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None
    )
    if binary is None:
        raise Unavailable("nginx is not installed (apt-get install -y nginx)")
    prefix = workdir / "nginx"
    prefix.mkdir(exist_ok=True)
    port = free_port()
    conf = (PEERS / "nginx.conf").read_text()
    for name, value in (
        ("@PREFIX@", str(prefix)),
        ("@PORT@", str(port)),
        ("@UPSTREAM@", emulator_url.removeprefix("http://")),
    ):
        conf = conf.replace(name, value)
    (prefix / "nginx.conf").write_text(conf)
    url = f"http://{HOST}:{port}"
    service = Service(
        "nginx",
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
        workdir=workdir,
        ready=_http_ok(url + "/stats"),
    )
    service.start()
    return Hop(url, _direct_key(accounts), [service], service)


def start_python_peer(
    row: str, script: str, workdir: Path, emulator_url: str, accounts: int
) -> Hop:
    """One of the Python pass-through peers in bench/peers (the client picks the key)."""
    port = free_port()
    service = Service(
        row,
        [
            *(sys.executable, str(PEERS / script), "--upstream", emulator_url),
            *("--host", HOST, "--port", str(port)),
        ],
        workdir=workdir,
        ready=lambda: _tcp_open(port),
        cwd=ROOT,
    )
    service.start()
    return Hop(f"http://{HOST}:{port}", _direct_key(accounts), [service], service)


def redis_state_available() -> str | None:
    """Why the gateway cannot run on Redis here, or None."""
    if importlib.util.find_spec("affinity.redis_state") is None:
        return "affinity/redis_state.py is not in this tree"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed"
    return None


def redis_server(name: str, workdir: Path) -> tuple[Service, str]:
    """A started redis-server of the benchmark's own (no persistence) and its URL."""
    port = free_port()
    server = Service(
        name,
        [
            *("redis-server", "--bind", HOST, "--port", str(port)),
            *("--save", "", "--appendonly", "no", "--dir", str(workdir)),
        ],
        workdir=workdir,
        ready=lambda: _tcp_open(port),
    )
    server.start()
    return server, f"redis://{HOST}:{port}/0"


def start_gateway(workdir: Path, emulator_url: str, accounts: int, redis: bool) -> Hop:
    services: list[Service] = []
    state: dict[str, Any] = {}
    aux = None
    if redis:
        reason = redis_state_available()
        if reason is not None:
            raise Unavailable(reason)
        aux, redis_url = redis_server("redis", workdir)
        services.append(aux)
        state = {"redis_url": redis_url}
    config = emulated_config(emulator_url, accounts=accounts, state=state)
    path = workdir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_defaults=True)))
    port = free_port()
    url = f"http://{HOST}:{port}"
    gateway = Service(
        "gateway",
        [
            *(sys.executable, "-m", "gateway", "--log-level", "warning", "serve"),
            *("--config", str(path), "--host", HOST, "--port", str(port)),
            *("--drain-seconds", "1"),
        ],
        workdir=workdir,
        ready=_http_ok(url + "/readyz"),
        cwd=ROOT,
    )
    try:
        gateway.start()
    except RuntimeError:
        for service in services:
            service.stop()
        raise
    services.append(gateway)
    return Hop(url, lambda r: DEMO_KEY, services, gateway, aux)


def _tcp_open(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def default_litellm_venv() -> Path:
    return Path(tempfile.gettempdir()) / "affinity-gateway-bench" / "venv-litellm"


def ensure_litellm(venv: Path, install: bool) -> Path:
    """The `litellm` command of a virtualenv of its own, made on first use."""
    command = venv / "bin" / "litellm"
    if command.exists():
        return command
    if not install:
        raise Unavailable(f"no LiteLLM virtualenv at {venv} and --no-install given")
    print(f"installing litellm[proxy] into {venv} (once)", file=sys.stderr)
    try:
        subprocess.run(
            ["python3", "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120
        )
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "litellm[proxy]"],
            check=True,
            capture_output=True,
            timeout=900,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        last = detail.decode(errors="replace").strip().splitlines()[-1:] or [str(exc)]
        raise Unavailable(f"pip install litellm[proxy] failed: {last[0][:120]}") from None
    if not command.exists():
        raise Unavailable("litellm[proxy] installed no `litellm` command")
    return command


def start_litellm(
    workdir: Path, emulator_url: str, accounts: int, venv: Path, install: bool
) -> Hop:
    command = ensure_litellm(venv, install)
    config = yaml.safe_load((PEERS / "litellm.yaml").read_text())
    config["model_list"] = [
        {
            "model_name": model,
            "litellm_params": {
                "model": f"{provider}/{model}",
                "api_base": base,
                "api_key": f"sk-emu-{i}",
            },
        }
        for model, provider, base in (
            ("gpt-4o-mini", "openai", emulator_url + "/v1"),
            ("claude-sonnet-4-6", "anthropic", emulator_url),
        )
        for i in range(accounts)
    ]
    key = config["general_settings"]["master_key"]
    path = workdir / "litellm.yaml"
    path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.endswith("_API_KEY") and k not in ("DATABASE_URL", "REDIS_URL")
    }
    # Offline: the model price map shipped in the package, no telemetry.
    env.update(LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
    service = Service(
        "litellm",
        [
            *(str(command), "--config", str(path), "--host", HOST, "--port", str(port)),
            *("--num_workers", "1"),
        ],
        workdir=workdir,
        ready=_http_ok(url + "/health/liveliness"),
        env=env,
        cwd=workdir,
    )
    try:
        service.start(timeout=180)
    except RuntimeError as exc:
        service.stop()
        raise Unavailable(f"the LiteLLM proxy did not start: {str(exc)[-160:]}") from None
    return Hop(url, lambda r: key, [service], service)


# --- the client -----------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    ok: bool
    latency: float  # seconds from sending to the last byte
    ttft: float | None  # streams: seconds to the first event that carries output text
    ttfb: float | None = None  # streams: seconds to the first body byte
    status: int = 0
    detail: str = ""  # a failure: what went wrong, in short


async def _one(session: aiohttp.ClientSession, base: str, request: Request, key: str) -> Sample:
    headers = {
        "authorization": f"Bearer {key}",
        "content-type": "application/json",
        "accept-encoding": "identity",  # a compressing proxy would spend CPU the others do not
    }
    if request.path == "/v1/messages":
        headers["anthropic-version"] = ANTHROPIC_VERSION
    t0 = time.perf_counter()
    first: float | None = None
    token: float | None = None
    try:
        async with session.post(base + request.path, data=request.body, headers=headers) as r:
            parts = []
            async for chunk in r.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                if token is None and _TOKEN.search(chunk):
                    token = time.perf_counter()
                parts.append(chunk)
            status = r.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        return Sample(False, time.perf_counter() - t0, None, detail=type(exc).__name__)
    latency = time.perf_counter() - t0
    body = b"".join(parts)
    ok = status == 200 and complete_answer(request, body)
    ttft = token - t0 if request.stream and token is not None else None
    ttfb = first - t0 if request.stream and first is not None else None
    detail = "" if ok else f"{request.path} stream={request.stream}: {body[-160:]!r}"
    return Sample(ok, latency, ttft, ttfb, status, detail)


# An event with output text: an OpenAI delta with non-empty content, an Anthropic
# content_block_delta. The preamble before it (role, message_start) carries no token.
_TOKEN = re.compile(rb'"content":"[^"]|"content_block_delta"')


def complete_answer(request: Request, body: bytes) -> bool:
    """A whole answer: a stream that reached its end event, or JSON with usage."""
    if request.stream:
        tail = body[-256:]
        return b"[DONE]" in tail or b"message_stop" in tail
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("usage"), dict)


async def drive(
    base: str,
    requests: Sequence[Request],
    key: Callable[[Request], str],
    concurrency: int,
    limit_seconds: float,
) -> tuple[list[Sample], float]:
    """Closed loop: ``concurrency`` workers take the requests in order. (samples, seconds)"""
    samples: list[Sample | None] = [None] * len(requests)
    cursor = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal cursor
        while cursor < len(requests):
            i = cursor
            cursor += 1
            samples[i] = await _one(session, base, requests[i], key(requests[i]))

    connector = aiohttp.TCPConnector(limit=concurrency, keepalive_timeout=60)
    t0 = time.perf_counter()
    async with aiohttp.ClientSession(
        connector=connector, auto_decompress=False, timeout=aiohttp.ClientTimeout(total=120)
    ) as session:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit_seconds):
                await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    seconds = time.perf_counter() - t0
    return [s if s is not None else Sample(False, math.nan, None) for s in samples], seconds


# --- one measurement ------------------------------------------------------------------


@dataclass(slots=True)
class Measurement:
    row: str
    concurrency: int
    repeat: int
    unavailable: str | None = None
    samples: list[Sample] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float | None = None  # the proxy's process tree, during the run
    sys_cpu_seconds: float | None = None  # of it, in the kernel (system calls, TCP)
    aux_cpu_seconds: float | None = None  # redis-server, during the run
    emulator_cpu_seconds: float = 0.0
    client_cpu_seconds: float = 0.0  # this process, the load generator
    peak_rss: int | None = None  # bytes, the proxy's process tree
    prompt_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> int:
        return sum(s.ok for s in self.samples)

    @property
    def throughput(self) -> float:
        return len(self.samples) / self.seconds if self.seconds else 0.0

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class Options:
    requests: int = 400
    concurrency: tuple[int, ...] = (4, 32)
    repeat: int = 3
    rows: tuple[str, ...] = DEFAULT_ROWS
    accounts: int = 4
    timeout: float = 300.0
    litellm_venv: Path = field(default_factory=default_litellm_venv)
    install: bool = True
    provider: str = "paced"
    profile: Path | None = None  # py-spy raw samples of each proxy run go in this directory
    answers: str = "mixed"  # or only "streamed" / only "json" calls


@contextlib.contextmanager
def _profiled(directory: Path | None, service: Service | None, name: str) -> Iterator[None]:
    """py-spy samples of the proxy process while the body runs (raw format, 200 Hz)."""
    if directory is None or service is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    beside = Path(sys.executable).parent / "py-spy"
    spy = subprocess.Popen(
        [
            *(
                str(beside) if beside.exists() else "py-spy",
                "record",
                "--nonblocking",
                "--format",
                "raw",
                "-r",
                "200",
            ),
            *("--pid", str(service.pid), "-o", str(directory / f"{name}.txt")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=30)


def start_hop(row: str, workdir: Path, emulator_url: str, opts: Options) -> Hop:
    if row == "direct":
        return Hop(emulator_url, _direct_key(opts.accounts))
    if row == "nginx":
        return start_nginx(workdir, emulator_url, opts.accounts)
    if row in PYTHON_PEERS:
        return start_python_peer(row, PYTHON_PEERS[row], workdir, emulator_url, opts.accounts)
    if row in ("gateway", "gateway+redis"):
        return start_gateway(workdir, emulator_url, opts.accounts, redis=row == "gateway+redis")
    if row == "litellm":
        return start_litellm(workdir, emulator_url, opts.accounts, opts.litellm_venv, opts.install)
    raise ValueError(f"unknown row {row!r}")


async def measure(
    row: str, concurrency: int, repeat: int, requests: Sequence[Request], opts: Options
) -> Measurement:
    result = Measurement(row, concurrency, repeat)
    with tempfile.TemporaryDirectory(prefix="ag-overhead-") as tmp:
        workdir = Path(tmp)
        emulator, emulator_url = start_emulator(workdir, opts.accounts, opts.provider)
        hop: Hop | None = None
        try:
            try:
                hop = start_hop(row, workdir, emulator_url, opts)
            except Unavailable as exc:
                result.unavailable = str(exc)
                return result
            warm, _ = await drive(
                hop.url,
                warmup_requests(max(WARMUP_REQUESTS, 2 * concurrency)),
                hop.key,
                concurrency,
                60,
            )
            bad = [s for s in warm if not s.ok]
            if bad:
                raise RuntimeError(
                    f"{row}: {len(bad)} warm-up requests failed: {bad[0].status} {bad[0].detail}"
                )
            _post(emulator_url + "/stats/reset")
            services = {"proxy": hop.measured, "aux": hop.aux}
            trees = {name: process_tree(s.pid) for name, s in services.items() if s is not None}
            emulator_tree = process_tree(emulator.pid)
            before = {name: cpu_seconds(t) for name, t in trees.items()}
            sys_before = cpu_seconds(trees["proxy"], system_only=True) if "proxy" in trees else 0
            emulator_before = cpu_seconds(emulator_tree)
            client_before = _own_cpu()
            with _profiled(opts.profile, hop.measured, f"{row}-c{concurrency}-r{repeat + 1}"):
                result.samples, result.seconds = await drive(
                    hop.url, requests, hop.key, concurrency, opts.timeout
                )
            result.client_cpu_seconds = _own_cpu() - client_before
            after = {name: cpu_seconds(t) for name, t in trees.items()}
            result.emulator_cpu_seconds = cpu_seconds(emulator_tree) - emulator_before
            if "proxy" in trees:
                result.cpu_seconds = after["proxy"] - before["proxy"]
                result.sys_cpu_seconds = cpu_seconds(trees["proxy"], system_only=True) - sys_before
                result.peak_rss = peak_rss(process_tree(hop.measured.pid))  # type: ignore[union-attr]
            if "aux" in trees:
                result.aux_cpu_seconds = after["aux"] - before["aux"]
            totals = _get_json(emulator_url + "/stats")["totals"]
            result.prompt_tokens = int(totals["prompt_tokens"])
            result.cached_tokens = int(totals["cached_tokens"])
        finally:
            if hop is not None:
                hop.stop()
            emulator.stop()
    return result


# --- the report -----------------------------------------------------------------------


def _quantile(values: Sequence[float], q: float) -> float:
    data = sorted(v for v in values if not math.isnan(v))
    if not data:
        return math.nan
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass(slots=True)
class Summary:
    """One row at one concurrency: each figure the median over the repeats."""

    row: str
    concurrency: int
    unavailable: str | None
    requests: int = 0
    failed: int = 0
    throughput: float = math.nan
    throughput_ratio: float = math.nan  # against direct
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    added_p50_ms: float = math.nan  # quantile of this row minus the same quantile direct
    added_p99_ms: float = math.nan
    paired_p50_ms: float = math.nan  # median of per-request differences, same request
    ttft_p50_ms: float = math.nan  # streams: time to the first output token
    added_ttft_p50_ms: float = math.nan
    ttfb_p50_ms: float = math.nan  # streams: time to the first body byte
    added_ttfb_p50_ms: float = math.nan
    cpu_ms: float = math.nan  # proxy CPU per request
    sys_cpu_ms: float = math.nan  # of it, in the kernel
    aux_cpu_ms: float = math.nan
    emulator_cpu_ms: float = math.nan
    client_cpu_ms: float = math.nan
    peak_rss_mb: float = math.nan
    hit_rate: float = math.nan
    repeats: list[dict[str, float]] = field(default_factory=list)


def _per_repeat(m: Measurement, direct: Measurement | None) -> dict[str, float]:
    lat = [s.latency for s in m.samples if s.ok]
    ttft = [s.ttft for s in m.samples if s.ok and s.ttft is not None]
    ttfb = [s.ttfb for s in m.samples if s.ok and s.ttfb is not None]
    n = len(m.samples) or 1
    out = {
        "throughput": m.throughput,
        "p50_ms": _quantile(lat, 0.5) * 1000,
        "p99_ms": _quantile(lat, 0.99) * 1000,
        "ttft_p50_ms": _quantile(ttft, 0.5) * 1000,
        "ttfb_p50_ms": _quantile(ttfb, 0.5) * 1000,
        "cpu_ms": m.cpu_seconds / n * 1000 if m.cpu_seconds is not None else math.nan,
        "sys_cpu_ms": (m.sys_cpu_seconds / n * 1000 if m.sys_cpu_seconds is not None else math.nan),
        "aux_cpu_ms": m.aux_cpu_seconds / n * 1000 if m.aux_cpu_seconds is not None else math.nan,
        "emulator_cpu_ms": m.emulator_cpu_seconds / n * 1000,
        "client_cpu_ms": m.client_cpu_seconds / n * 1000,
        "peak_rss_mb": m.peak_rss / 2**20 if m.peak_rss is not None else math.nan,
        "hit_rate": m.hit_rate,
    }
    if direct is not None and direct.samples:
        base = _per_repeat(direct, None)
        out["throughput_ratio"] = out["throughput"] / base["throughput"]
        out["added_p50_ms"] = out["p50_ms"] - base["p50_ms"]
        out["added_p99_ms"] = out["p99_ms"] - base["p99_ms"]
        out["added_ttft_p50_ms"] = out["ttft_p50_ms"] - base["ttft_p50_ms"]
        out["added_ttfb_p50_ms"] = out["ttfb_p50_ms"] - base["ttfb_p50_ms"]
        pairs = [
            (a.latency - b.latency) * 1000
            for a, b in zip(m.samples, direct.samples, strict=True)
            if a.ok and b.ok
        ]
        out["paired_p50_ms"] = _quantile(pairs, 0.5)
    return out


def summarise(measurements: Sequence[Measurement]) -> list[Summary]:
    direct = {(m.concurrency, m.repeat): m for m in measurements if m.row == "direct"}
    keys = list(dict.fromkeys((m.row, m.concurrency) for m in measurements))
    out = []
    for row, conc in keys:
        runs = [m for m in measurements if m.row == row and m.concurrency == conc]
        unavailable = next((m.unavailable for m in runs if m.unavailable), None)
        summary = Summary(row, conc, unavailable)
        if unavailable is None:
            summary.requests = sum(len(m.samples) for m in runs)
            summary.failed = sum(len(m.samples) - m.ok for m in runs)
            summary.repeats = [
                _per_repeat(m, direct.get((conc, m.repeat)) if row != "direct" else None)
                for m in runs
            ]
            for name in summary.repeats[0]:
                values = [r[name] for r in summary.repeats if not math.isnan(r[name])]
                if values:
                    setattr(summary, name, statistics.median(values))
            if row == "direct":
                summary.throughput_ratio = 1.0
        out.append(summary)
    return out


def _f(value: float, fmt: str) -> str:
    return "-" if math.isnan(value) else format(value, fmt)


def table(summaries: Sequence[Summary], concurrency: int) -> str:
    headers = [
        "row", "req/s", "x direct", "p50 ms", "p99 ms", "+p50 ms", "+p99 ms", "paired +p50",
        "+TTFT p50", "+TTFB p50", "CPU ms/req", "in kernel", "peak RSS MB", "cache hit",
        "failed",
    ]  # fmt: skip
    rows: list[list[object]] = []
    for s in summaries:
        if s.concurrency != concurrency:
            continue
        if s.unavailable is not None:
            rows.append([s.row, f"not available: {s.unavailable}", *[""] * (len(headers) - 2)])
            continue
        rows.append(
            [
                s.row,
                _f(s.throughput, ".0f"),
                _f(s.throughput_ratio, ".2f"),
                _f(s.p50_ms, ".1f"),
                _f(s.p99_ms, ".1f"),
                _f(s.added_p50_ms, "+.2f"),
                _f(s.added_p99_ms, "+.1f"),
                _f(s.paired_p50_ms, "+.2f"),
                _f(s.added_ttft_p50_ms, "+.2f"),
                _f(s.added_ttfb_p50_ms, "+.2f"),
                _f(s.cpu_ms, ".2f"),
                _f(s.sys_cpu_ms, ".2f"),
                _f(s.peak_rss_mb, ".0f"),
                _f(s.hit_rate, ".1%"),
                f"{s.failed}/{s.requests}",
            ]
        )
    return render(headers, rows)


def notes(summaries: Sequence[Summary]) -> list[str]:
    redis = [
        f"{s.row} @ {s.concurrency}: redis-server CPU {s.aux_cpu_ms:.2f} ms/req "
        "(not in the CPU column)"
        for s in summaries
        if not math.isnan(s.aux_cpu_ms)
    ]
    emulator = [
        f"direct @ {s.concurrency}: emulator {s.emulator_cpu_ms:.2f} ms CPU/req (one core: "
        f"~{1000 / s.emulator_cpu_ms:.0f} req/s), client {s.client_cpu_ms:.2f} ms CPU/req"
        for s in summaries
        if s.row == "direct" and s.emulator_cpu_ms > 0 and s.client_cpu_ms > 0
    ]
    return redis + emulator


# --- pin-index footprint ----------------------------------------------------------------

FOOTPRINT_PROMPT_BYTES = 8 * 1024  # 2k tokens: pins the blocks from 4 KB (1,024 tokens) on


def _pin_fingerprints(count: int) -> list[Any]:
    """``count`` prompts that share no prefix (a unique head), each ~8 KB."""
    from affinity.fingerprint import fingerprint

    filler = " ".join(f"w{i % 97}" for i in range(FOOTPRINT_PROMPT_BYTES // 4))
    filler = filler[:FOOTPRINT_PROMPT_BYTES]
    return [
        fingerprint(
            {
                "model": "gpt-4o-mini",
                "messages": [
                    {"role": "system", "content": f"prompt {i}: {filler}"},
                    {"role": "user", "content": "hello"},
                ],
            },
            kind="chat",
        )
        for i in range(count)
    ]


def _bench_accounts() -> list[Any]:
    from affinity.types import AccountSpec

    return [AccountSpec(f"acct-{i}") for i in range(4)]


def memory_footprint(count: int) -> dict[str, float]:
    """Bytes the embedded MemoryState holds for ``count`` pinned prompts (tracemalloc)."""
    import gc
    import tracemalloc

    from affinity.memory import MemoryState
    from affinity.types import Demand, Outcome

    tracemalloc.start()
    fps = _pin_fingerprints(count)
    accounts = _bench_accounts()
    state = MemoryState(max_pins=10 * count)
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    done = Outcome(True, 2048, 1024, 0, 32, 0)
    for i, fp in enumerate(fps):
        account = accounts[i % len(accounts)]
        now = state.now()
        state.begin_now(account, fp, Demand(fp.total_tokens, 32), now)
        state.end_now(account, fp, done, now)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    pins = state.pin_count()
    return {"prompts": count, "pins": pins, "bytes": grown, "bytes_per_pin": grown / pins}


async def redis_footprint(count: int, workdir: Path) -> dict[str, float] | str:
    """Redis ``used_memory`` growth for ``count`` pinned prompts, or why it cannot run."""
    reason = redis_state_available()
    if reason is not None:
        return reason
    from redis.asyncio import Redis

    from affinity.redis_state import RedisState
    from affinity.types import Demand, Outcome

    server, url = redis_server("redis-footprint", workdir)
    client = Redis.from_url(url)
    state = RedisState(url, socket_timeout=5.0, max_pins=10 * count)
    try:
        fps = _pin_fingerprints(count)
        accounts = _bench_accounts()
        before = int((await client.info("memory"))["used_memory"])
        done = Outcome(True, 2048, 1024, 0, 32, 0)

        async def pin(i: int) -> None:
            account, fp = accounts[i % len(accounts)], fps[i]
            now = state.now()
            await state.begin(account, fp, Demand(fp.total_tokens, 32), now)
            await state.end(account, fp, done, now)

        batch = 64
        for start in range(0, count, batch):
            await asyncio.gather(*(pin(i) for i in range(start, min(start + batch, count))))
        after = int((await client.info("memory"))["used_memory"])
        keys = int(await client.dbsize())
        if state.errors_total:
            return f"{state.errors_total} Redis calls failed during the fill"
        pins = sum(len(fp.hashes) - fp.pin_from for fp in fps)
        return {
            "prompts": count,
            "pins": pins,
            "keys": keys,
            "bytes": after - before,
            "bytes_per_pin": (after - before) / pins,
        }
    finally:
        await state.aclose()
        await client.aclose()
        server.stop()


def footprint(count: int) -> str:
    """The pin index's memory for ``count`` prompts, embedded and in Redis, as text."""
    lines = [f"pin index footprint: {count:,} prompts of {FOOTPRINT_PROMPT_BYTES // 1024} KB"]
    mem = memory_footprint(count)
    lines.append(
        f"  embedded MemoryState: {mem['bytes'] / 2**20:.1f} MiB for {mem['pins']:,.0f} pins "
        f"({mem['bytes_per_pin']:.0f} B/pin, {mem['bytes'] / count:.0f} B/prompt)"
    )
    with tempfile.TemporaryDirectory(prefix="ag-footprint-") as tmp:
        red = asyncio.run(redis_footprint(count, Path(tmp)))
    if isinstance(red, str):
        lines.append(f"  Redis: not available: {red}")
    else:
        lines.append(
            f"  Redis used_memory: {red['bytes'] / 2**20:.1f} MiB for {red['pins']:,.0f} pins in "
            f"{red['keys']:,.0f} keys ({red['bytes_per_pin']:.0f} B/pin, "
            f"{red['bytes'] / count:.0f} B/prompt)"
        )
    return "\n".join(lines)


# --- the command ----------------------------------------------------------------------


def _intlist(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _rows(text: str) -> tuple[str, ...]:
    rows = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown rows {unknown}; known: {', '.join(ROWS)}")
    return rows


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path | None, int]:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=400, help="requests per measurement")
    p.add_argument("--concurrency", type=_intlist, default=(4, 32), help="e.g. 4,32")
    p.add_argument("--repeat", type=int, default=3, help="measurements per cell; medians shown")
    p.add_argument(
        "--rows",
        type=_rows,
        default=DEFAULT_ROWS,
        help=f"subset of {','.join(ROWS)} ({' and '.join(OPT_IN)} only when named)",
    )
    p.add_argument("--accounts", type=int, default=4, help="emulated provider accounts")
    p.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        default="paced",
        help="the emulator's latency profile (default paced: the issue's reference pace)",
    )
    p.add_argument(
        "--answers",
        choices=ANSWERS,
        default="mixed",
        help="send only streamed or only JSON calls (default mixed: half of each)",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per measurement, at most")
    p.add_argument("--litellm-venv", type=Path, default=default_litellm_venv())
    p.add_argument("--no-install", action="store_true", help="never pip-install LiteLLM")
    p.add_argument("--json", type=Path, default=None, help="write every figure here too")
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="DIR",
        help="record each proxy run with py-spy (raw samples) into DIR",
    )
    p.add_argument(
        "--footprint",
        type=int,
        default=0,
        metavar="PROMPTS",
        help="instead: the pin index's memory for this many prompts (embedded and Redis)",
    )
    a = p.parse_args(argv)
    if "direct" not in a.rows:
        a.rows = ("direct", *a.rows)  # every figure is relative to it
    opts = Options(
        requests=a.requests,
        concurrency=a.concurrency,
        repeat=a.repeat,
        rows=a.rows,
        accounts=a.accounts,
        timeout=a.timeout,
        litellm_venv=a.litellm_venv,
        install=not a.no_install,
        provider=a.provider,
        profile=a.profile,
        answers=a.answers,
    )
    return opts, a.json, a.footprint


async def run(opts: Options, progress: TextIO = sys.stderr) -> list[Measurement]:
    requests = workload(opts.requests, answers=opts.answers)
    out: list[Measurement] = []
    unavailable: dict[str, str] = {}
    for repeat in range(opts.repeat):
        for concurrency in opts.concurrency:
            for row in opts.rows:
                if row in unavailable:
                    out.append(Measurement(row, concurrency, repeat, unavailable[row]))
                    continue
                t0 = time.monotonic()
                m = await measure(row, concurrency, repeat, requests, opts)
                if m.unavailable:
                    unavailable[row] = m.unavailable
                    print(f"  {row}: not available: {m.unavailable}", file=progress)
                else:
                    print(
                        f"  repeat {repeat + 1}/{opts.repeat} c={concurrency:<3} {row:<14} "
                        f"{m.throughput:7.1f} req/s  {m.ok}/{len(m.samples)} ok  "
                        f"({time.monotonic() - t0:.0f} s)",
                        file=progress,
                        flush=True,
                    )
                out.append(m)
    return out


def describe(requests: Sequence[Request], provider: str) -> str:
    sizes = sorted(len(r.body) for r in requests)
    streams = sum(r.stream for r in requests)
    anthropic = sum(r.path == "/v1/messages" for r in requests)
    tenants = len({r.tenant for r in requests})
    latency = PROVIDERS[provider]
    return (
        f"{len(requests)} requests, {tenants} tenants, prompts {sizes[0] / 1024:.0f}-"
        f"{sizes[-1] / 1024:.0f} KB (median {sizes[len(sizes) // 2] / 1024:.0f} KB), "
        f"{streams} streamed, {anthropic} Anthropic /v1/messages; emulator {provider}: "
        f"{latency['base_ms']:g} ms + {latency['prefill_ms_per_1k_uncached']:g} ms/1k uncached "
        f"+ {latency['decode_ms_per_token']:g} ms/token x {OUTPUT_TOKENS} tokens"
    )


def report(opts: Options, measurements: Sequence[Measurement]) -> str:
    summaries = summarise(measurements)
    lines = [
        describe(workload(opts.requests, answers=opts.answers), opts.provider),
        f"medians of {opts.repeat} repeat(s)",
        "",
    ]
    for concurrency in opts.concurrency:
        lines += [f"concurrency {concurrency}", table(summaries, concurrency), ""]
    lines += notes(summaries)
    return "\n".join(lines)


def to_json(opts: Options, measurements: Sequence[Measurement]) -> bytes:
    summaries = summarise(measurements)
    doc = {
        "options": {**asdict(opts), "litellm_venv": str(opts.litellm_venv)},
        "workload": describe(workload(opts.requests, answers=opts.answers), opts.provider),
        "summaries": [asdict(s) for s in summaries],
        "measurements": [
            {
                "row": m.row,
                "concurrency": m.concurrency,
                "repeat": m.repeat,
                "unavailable": m.unavailable,
                "requests": len(m.samples),
                "ok": m.ok,
                "statuses": sorted({s.status for s in m.samples}),
            }
            for m in measurements
        ],
    }
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds through every Service.stop()


def main(argv: Sequence[str] | None = None) -> int:
    opts, json_path, footprint_prompts = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    if footprint_prompts:
        print(footprint(footprint_prompts))
        return 0
    requests = workload(opts.requests, answers=opts.answers)
    print(f"bench.overhead: {describe(requests, opts.provider)}", file=sys.stderr)
    try:
        import uvloop

        measurements = uvloop.run(run(opts))
    except ImportError:
        measurements = asyncio.run(run(opts))
    print(report(opts, measurements))
    if json_path is not None:
        json_path.write_bytes(to_json(opts, measurements))
    failed = any(m.ok != len(m.samples) for m in measurements if not m.unavailable)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
