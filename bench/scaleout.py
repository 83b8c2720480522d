"""Scale-out proof: the Mooncake trace through one gateway and through replicas behind a
real load balancer, side by side in one run.

    .venv/bin/python -m bench.scaleout [--limit N] [--time-scale S] [--replicas 3]
                                       [--lb auto|nginx|haproxy] [--redis-timeout SEC]

Rows, each on a fresh provider emulator (cold caches; its own process, as in
bench.replay) and, where Redis is used, fresh keys (a key prefix of its own on one
redis-server started for the run):

    single          one `affinity-gateway serve` process, embedded state
    single-redis    one gateway process with its state in Redis
    replicas        N gateway processes sharing Redis behind a round-robin load balancer
                    (nginx or haproxy from the distribution, bench/lb/, in the foreground)
    replicas-kill   the same, one replica killed with SIGKILL a third of the way through
                    (just after a burst of requests was sent, so that some are inside it)

The workload and the provider are bench.replay's: the trace sent open loop at
``at / time_scale``, 8 accounts whose rpm and itpm put the pool at 70 % in the trace's
busiest minute, a 5-minute cache TTL and a 60-second window (both compressed by the
time scale). The client never retries a failed request (only a gateway's 429 with
Retry-After, as an SDK would), so every loss shows.

In the kill row the load balancer's access log tells which requests were on the killed
replica when it died: sent to it, started before its exit was seen, unfinished when the
signal was sent. The client's failures are joined to that log by request id (the
gateway's, or the load balancer's own for a response it made itself), so a failure is
either one of those in-flight requests or a loss beyond them.

Below the table: the kill's details, CPU seconds by role during the replay, Redis's
script calls and failed commands, the gateways' warnings, and their routing decisions
with the routing loss by decision. docs/scale-out.md explains a run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import multiprocessing
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
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson
import redis.asyncio as aioredis
import yaml

from bench.common import (
    CACHE_TTL_SECONDS,
    MAX_OUTPUT_TOKENS,
    MIN_CACHE_TOKENS,
    MOONCAKE_TRACE,
    WINDOW_SECONDS,
    BlockText,
    EmulatorProcess,
    Record,
    Setup,
    TraceRequest,
    attach_decisions,
    emulator_config,
    limits_for,
    load_trace,
    over_limit,
    peak_minute,
    peak_ratio,
    routing_loss,
    send_all,
)
from gateway.presets import DEMO_KEY, emulated_config
from gateway.table import render

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ROOT = Path(__file__).resolve().parent.parent
LB_TEMPLATES = Path(__file__).parent / "lb"
LB_KINDS = ("nginx", "haproxy")
ROWS = ("single", "single-redis", "replicas", "replicas-kill")

DEFAULT_TIME_SCALE = 60.0
DEFAULT_REPLICAS = 3
DEFAULT_CONCURRENCY = 64
DEFAULT_KILL_AT = 1 / 3
# The kill lands this long after the first requests due at --kill-at were sent, while they
# are inside the replica: the trace's requests come in bursts on whole seconds, and a kill
# between bursts would find nothing in flight.
KILL_AFTER_SEND = 0.010
# Seconds the gateway waits for Redis before answering from local state: its own default.
DEFAULT_REDIS_TIMEOUT = 0.05
START_TIMEOUT = 60.0

# What the issue asks of the scaled-out gateway.
TARGET_HIT_POINTS = 2.0  # replica rows' hit rate within 2 points of the single gateway


class Unavailable(Exception):
    """Something the benchmark needs is not installed; the message says what."""


class StartError(Exception):
    """A server did not come up; the message carries the tail of its log."""


# --- processes -----------------------------------------------------------------------------


class Child:
    """A server in a process group of its own, its output in a log file of the run."""

    def __init__(
        self, name: str, argv: Sequence[str], workdir: Path, *, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = workdir / f"{name}.log"
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None

    def start(self) -> Child:
        self._log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # a Ctrl-C reaches this process, which stops them in order
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def kill(self) -> None:
        """SIGKILL to this process alone: the failure under test."""
        if self.running:
            self.pid_kill(signal.SIGKILL)

    def pid_kill(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL to its process group if it outlives ``grace`` seconds."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                self.pid_kill(signal.SIGTERM)
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    """``name`` on PATH, or in the sbin directories a Debian package installs it to."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def pick_lb(kind: str) -> tuple[str, str]:
    """The load balancer to use and its binary; ``auto`` takes the first one installed."""
    kinds = LB_KINDS if kind == "auto" else (kind,)
    for k in kinds:
        binary = find_binary(k)
        if binary is not None:
            return k, binary
    wanted = " or ".join(kinds)
    raise Unavailable(f"{wanted} is not installed (apt-get install -y {' '.join(kinds)})")


async def http_ok(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


async def _tcp_open(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), 1)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def wait_ready(
    child: Child, check: Callable[[], Awaitable[bool]], within: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not child.running:
            raise StartError(f"{child.name} exited during startup:\n{child.tail()}")
        if await check():
            return
        await asyncio.sleep(0.05)
    raise StartError(f"{child.name} not ready after {within:.0f} s:\n{child.tail()}")


def redis_child(workdir: Path) -> tuple[Child, int]:
    binary = find_binary("redis-server")
    if binary is None:
        raise Unavailable("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    argv = [
        *(binary, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"),
        *("--dir", str(workdir)),
    ]
    return Child("redis", argv, workdir), port


# --- what the machine did ------------------------------------------------------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a live process, from /proc; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu(pid: int) -> float:
    """A process and its direct children (nginx's master and worker)."""
    total = proc_cpu(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                total += proc_cpu(int(stat.parent.name))
    return total


def machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (every process, not idle or iowait)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    except (OSError, ValueError):
        return 0.0
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def emulator_pid() -> int | None:
    """The emulator's process (bench.common starts it as a child named "emulator")."""
    return next((p.pid for p in multiprocessing.active_children() if p.name == "emulator"), None)


_VARIABLE = re.compile(r"[0-9a-f]{16,}|\d+(\.\d+)?")


def log_warnings(paths: Sequence[Path]) -> Counter[str]:
    """WARNING and ERROR lines of the gateways' logs, by message with numbers and ids
    blanked."""
    out: Counter[str] = Counter()
    for path in paths:
        try:
            lines = path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in lines:
            for level in (" WARNING ", " ERROR "):
                if level in line:
                    message = line.split(level, 1)[1]
                    out[level.strip() + " " + _VARIABLE.sub("#", message)[:160]] += 1
    return out


async def redis_counters(url: str) -> dict[str, float]:
    """Redis's cumulative error counts and EVALSHA calls and time ({} if unreachable)."""
    client = aioredis.Redis.from_url(url, socket_timeout=5)
    try:
        errors = await client.info("errorstats")
        commands = await client.info("commandstats")
    except (aioredis.RedisError, OSError):
        return {}
    finally:
        await client.aclose()
    # Error replies by kind; with a Redis older than the client they include every new
    # connection's refused CLIENT SETINFO (harmless), so the notes show failed commands.
    out = {f"error:{k.removeprefix('errorstat_')}": float(v["count"]) for k, v in errors.items()}
    evalsha = commands.get("cmdstat_evalsha", {})
    out["evalsha_calls"] = float(evalsha.get("calls", 0))
    out["evalsha_usec"] = float(evalsha.get("usec", 0))
    for name, stat in commands.items():
        bad = stat.get("failed_calls", 0) + stat.get("rejected_calls", 0)
        if bad:
            out[f"failed:{name.removeprefix('cmdstat_')}"] = float(bad)
    return out


# --- the load balancer -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LbEntry:
    """One request as the load balancer logged it (times: epoch seconds)."""

    lb_id: str
    gateway_id: str
    start: float
    end: float
    status: int
    replica: str  # host:port of the last replica it was sent to, "" if none


class LoadBalancer:
    """nginx or haproxy, round robin over the replicas, from a template in bench/lb/."""

    def __init__(self, kind: str, binary: str, workdir: Path, servers: Sequence[str]) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.dir = workdir / f"lb-{self.port}"
        self.dir.mkdir()
        template = (LB_TEMPLATES / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")).read_text()
        conf = render_lb_config(template, self.port, servers, prefix=self.dir)
        if kind == "nginx":
            self.conf = self.dir / "nginx.conf"
            argv = [binary, "-p", str(self.dir), "-c", str(self.conf), "-e", "stderr"]
            self.log = self.dir / "access.log"
        else:
            self.conf = self.dir / "haproxy.cfg"
            argv = [binary, "-db", "-f", str(self.conf)]
            self.log = workdir / f"{kind}-{self.port}.log"  # the child's stdout
        self.conf.write_text(conf)
        self.child = Child(f"{kind}-{self.port}", argv, workdir)

    async def start(self, session: aiohttp.ClientSession) -> None:
        self.child.start()
        await wait_ready(self.child, lambda: http_ok(session, self.url + "/livez"))

    def stop(self) -> None:
        self.child.stop()

    def entries(self) -> list[LbEntry]:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return []
        parse = _nginx_entry if self.kind == "nginx" else _haproxy_entry
        out = []
        for line in lines:
            if line.startswith("{"):
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    out.append(parse(orjson.loads(line)))
        return out


def render_lb_config(template: str, port: int, servers: Sequence[str], *, prefix: Path) -> str:
    """Fill in a template of bench/lb/: the line holding @SERVER@ once per replica."""
    lines: list[str] = []
    for line in template.splitlines():
        if "@SERVER@" in line:
            lines.extend(
                line.replace("@SERVER@", server).replace("@NAME@", f"gw{i}")
                for i, server in enumerate(servers)
            )
        else:
            lines.append(line)
    text = "\n".join(lines) + "\n"
    return text.replace("@PORT@", str(port)).replace("@PREFIX@", str(prefix))


def _last_upstream(value: str) -> str:
    """nginx's $upstream_addr: "a, b" when it moved on, "a : b" across redirects."""
    parts = [p.strip() for p in value.replace(" : ", ",").split(",") if p.strip()]
    return parts[-1] if parts else ""


def _nginx_entry(d: dict[str, Any]) -> LbEntry:
    end = float(d["end"])
    return LbEntry(
        lb_id=str(d["id"]),
        gateway_id=str(d.get("gw", "")),
        start=end - float(d["duration"]),
        end=end,
        status=int(d["status"]),
        replica=_last_upstream(str(d.get("upstream", ""))),
    )


def _haproxy_entry(d: dict[str, Any]) -> LbEntry:
    start = float(d["accept"]) + max(float(d["idle_ms"]), 0.0) / 1000
    replica = str(d.get("upstream", ""))
    return LbEntry(
        lb_id=str(d["id"]),
        gateway_id=str(d.get("gw", "")).strip("{}"),
        start=start,
        end=start + max(float(d["duration_ms"]), 0.0) / 1000,
        status=int(d["status"]),
        replica="" if replica.startswith("-") else replica,
    )


# --- one row -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RowSpec:
    name: str
    replicas: int
    redis: bool
    kill: bool

    @property
    def lb(self) -> bool:
        return self.replicas > 1


def row_specs(names: Sequence[str], replicas: int) -> list[RowSpec]:
    specs = {
        "single": RowSpec("single", 1, redis=False, kill=False),
        "single-redis": RowSpec("single-redis", 1, redis=True, kill=False),
        "replicas": RowSpec("replicas", replicas, redis=True, kill=False),
        "replicas-kill": RowSpec("replicas-kill", replicas, redis=True, kill=True),
    }
    return [specs[n] for n in names]


@dataclass(frozen=True, slots=True)
class Kill:
    """When a replica was killed: the signal and the exit as the parent saw it."""

    signalled: float  # epoch seconds
    exited: float  # epoch seconds
    offset: float  # seconds since the client started, when signalled
    cpu: float  # the replica's CPU seconds just before


@dataclass(slots=True)
class KillReport:
    """What the kill cost, from the load balancer's log and the client's records."""

    replica: int  # index of the killed replica
    at_seconds: float  # into the run (real)
    signalled: float  # wall clock of the SIGKILL (the LB log's clock)
    exited: float  # wall clock when its exit was seen: its sockets were closed by then
    in_flight: int  # requests on the killed replica between the two (LB log)
    in_flight_at_signal: int  # of which: already on it when the signal was sent
    in_flight_all: int  # requests the client had in flight on any replica then
    failed_in_flight: int  # client failures among the in-flight ones
    failed_beyond: int  # client failures that were not in flight on the killed replica
    unlogged: int  # client failures the LB log does not name (counted in failed_beyond)
    unlogged_in_flight: int  # of which: sent before its exit was seen, unanswered at the signal
    failures_sent_ms: list[float] = field(default_factory=list)  # when sent, from the signal


@dataclass(slots=True)
class Result:
    row: str
    replicas: int
    state: str  # "embedded" or "redis"
    requests: int
    ok: int
    errors: int  # requests the client did not get a 200 for, whatever the reason
    shed: int  # of which: still 429 (saturated) after every retry
    retried: int  # requests the gateway answered 429 (saturated) at least once
    prompt_tokens: int  # provider-reported (emulator /stats)
    cached_tokens: int
    upstream_429: int  # rate-limit answers from the emulator's accounts
    over_limit: int  # admissions past an account's limit, reconstructed from the records
    routing_loss: int  # input tokens cached on another account than the one chosen (model)
    peak_ratio: float  # busiest account's busiest minute / mean of the accounts' busiest
    p50_ms: float
    p99_ms: float
    late_p99_ms: float
    seconds: float
    per_replica: list[int] = field(default_factory=list)  # requests each replica answered
    per_account: list[int] = field(default_factory=list)
    redis_fallbacks: int | None = None  # Redis calls answered from local state (survivors)
    decisions: dict[str, int] = field(default_factory=dict)  # routing reasons (survivors)
    kill: KillReport | None = None
    replay_seconds: float = 0.0  # wall clock of the replay itself
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds during it, by role
    redis: dict[str, float] = field(default_factory=dict)  # Redis's counters during it
    warnings: dict[str, int] = field(default_factory=dict)  # the gateways' log, by message
    loss_by_decision: dict[str, int] = field(default_factory=dict)  # routing loss, by decision
    failures: dict[str, int] = field(default_factory=dict)  # what the client saw, by kind

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def lost(self) -> int:
        """Client failures beyond the killed replica's in-flight requests."""
        return self.kill.failed_beyond if self.kill is not None else self.errors


@dataclass(frozen=True, slots=True)
class Context:
    requests: Sequence[TraceRequest]
    setup: Setup
    texts: BlockText
    workdir: Path
    lb_kind: str
    lb_binary: str
    redis_url: str
    redis_pid: int | None
    redis_timeout: float
    kill_at: float
    run_id: str
    log: Callable[[str], None]


def gateway_argv(config_path: Path, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "gateway", "--log-level", "warning", "serve"),
        *("--config", str(config_path), "--host", HOST, "--port", str(port)),
        *("--drain-seconds", "1", "--shutdown-delay", "0"),
    ]


def write_gateway_config(
    path: Path, emulator_url: str, setup: Setup, state: dict[str, Any]
) -> None:
    config = emulated_config(
        emulator_url,
        accounts=setup.accounts,
        affinity="prefix",
        limits={"rpm": setup.limits.rpm, "itpm": setup.limits.itpm},
        state=state,
        tuning={
            "ttl_seconds": setup.scaled(CACHE_TTL_SECONDS),
            "window_seconds": setup.scaled(WINDOW_SECONDS),
            "min_tokens": MIN_CACHE_TOKENS,
        },
    )
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The counters this benchmark reads from one replica's /metrics ({} if unreachable)."""
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return {}
            text = await r.text()
    except (aiohttp.ClientError, TimeoutError):
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_redis_fallbacks_total "):
            out["redis_fallbacks"] = float(line.split()[-1])
        elif line.startswith("gateway_affinity_decisions_total{"):
            labels, _, value = line.rpartition(" ")
            for part in labels[labels.index("{") + 1 : -1].split(","):
                key, _, raw = part.partition("=")
                if key == "reason":
                    reason = "decision:" + raw.strip('"')
                    out[reason] = out.get(reason, 0.0) + float(value)
    return out


def _percentile(values: Sequence[float], q: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def kill_report(
    records: Sequence[Record],
    entries: Sequence[LbEntry],
    *,
    killed: str,
    replica: int,
    kill: Kill,
) -> KillReport:
    """Join the client's records to the LB's log and account for every failure.

    In flight on the killed replica: sent to it (its last replica in the LB's log),
    started before its exit was seen and not finished when the signal was sent. A
    process dies some milliseconds after SIGKILL; a request handed to it meanwhile is
    in flight when it dies.
    """
    on_killed = {
        e.lb_id
        for e in entries
        if e.replica == killed and e.start <= kill.exited and e.end >= kill.signalled
    }
    by_id: dict[str, LbEntry] = {}
    for e in entries:
        by_id[e.lb_id] = e
        if e.gateway_id:
            by_id[e.gateway_id] = e
    at = kill.offset
    dying = at + (kill.exited - kill.signalled)
    failed_in = unlogged = unlogged_dying = 0
    failures = [r for r in records if not r.ok]
    for rec in failures:
        entry = by_id.get(rec.request_id) if rec.request_id else None
        if entry is None:
            unlogged += 1
            unlogged_dying += rec.last <= dying and (rec.done >= at or not rec.done)
        elif entry.lb_id in on_killed:
            failed_in += 1
    in_flight_all = sum(
        1 for r in records if r.sent and r.last <= at and (r.done >= at or not r.done)
    )
    return KillReport(
        replica=replica,
        at_seconds=at,
        signalled=kill.signalled,
        exited=kill.exited,
        in_flight=len(on_killed),
        in_flight_at_signal=sum(
            1 for e in entries if e.replica == killed and e.start <= kill.signalled <= e.end
        ),
        in_flight_all=in_flight_all,
        failed_in_flight=failed_in,
        failed_beyond=len(failures) - failed_in,
        unlogged=unlogged,
        unlogged_in_flight=unlogged_dying,
        failures_sent_ms=sorted(round((r.last - at) * 1000, 1) for r in failures),
    )


async def run_row(spec: RowSpec, ctx: Context) -> Result:
    """A fresh emulator, the row's gateways (and load balancer), the trace through them."""
    setup, requests = ctx.setup, ctx.requests
    t0 = time.monotonic()
    state: dict[str, Any] = {}
    if spec.redis:
        state = {
            "redis_url": ctx.redis_url,
            "key_prefix": f"so{ctx.run_id}-{spec.name}",
            "redis_socket_timeout": ctx.redis_timeout,
        }
    async with (
        EmulatorProcess(emulator_config(setup, setup.accounts, setup.limits)) as emulator,
        aiohttp.ClientSession() as session,
    ):
        gateways: list[tuple[Child, str]] = []
        lb: LoadBalancer | None = None
        kill_task: asyncio.Task[Kill] | None = None
        try:
            for i in range(spec.replicas):
                port = free_port()
                path = ctx.workdir / f"{spec.name}-gw{i}.yaml"
                write_gateway_config(path, emulator.url, setup, state)
                child = Child(f"{spec.name}-gw{i}", gateway_argv(path, port), ctx.workdir, cwd=ROOT)
                gateways.append((child.start(), f"{HOST}:{port}"))
            await asyncio.gather(
                *(wait_ready(child, readyz_check(session, addr)) for child, addr in gateways)
            )
            target = f"http://{gateways[0][1]}"
            if spec.lb:
                lb = LoadBalancer(ctx.lb_kind, ctx.lb_binary, ctx.workdir, [a for _, a in gateways])
                await lb.start(session)
                target = lb.url

            victim = len(gateways) - 1
            pids = {
                "gateways": [c.pid for c, _ in gateways],
                "lb": [lb.child.pid] if lb is not None else [],
                "redis": [ctx.redis_pid] if spec.redis and ctx.redis_pid else [],
                "emulator": [pid] if (pid := emulator_pid()) else [],
            }
            cpu0 = {role: sum(map(tree_cpu, ps)) for role, ps in pids.items()}
            cpu0["client"] = client_cpu()
            cpu0["machine"] = machine_cpu()
            redis0 = await redis_counters(ctx.redis_url) if spec.redis else {}
            t_start = time.monotonic()
            if spec.kill:
                kill_task = asyncio.create_task(
                    _kill_later(
                        gateways[victim][0], kill_delay(requests, setup, ctx.kill_at), t_start
                    )
                )

            def progress(i: int) -> None:
                ctx.log(f"  {spec.name}: {i}/{len(requests)} sent, {time.monotonic() - t0:.0f} s")

            records = await send_all(target, requests, setup, texts=ctx.texts, on_progress=progress)
            killed: Kill | None = None
            if kill_task is not None:
                killed = await kill_task
                kill_task = None
            replay_seconds = time.monotonic() - t_start
            cpu = {role: sum(map(tree_cpu, ps)) - cpu0[role] for role, ps in pids.items()}
            cpu["client"] = client_cpu() - cpu0["client"]
            if killed is not None:
                cpu["gateways"] += killed.cpu
            # Whatever else ran on the machine meanwhile (other jobs, the kernel's share).
            cpu["other"] = max(0.0, machine_cpu() - cpu0["machine"] - sum(cpu.values()))
            redis1 = await redis_counters(ctx.redis_url) if spec.redis else {}
            counters = [
                await scrape(session, f"http://{addr}") for c, addr in gateways if c.running
            ]
            # Each request's routing decision, from the usage log (shared in Redis).
            survivor = next(addr for c, addr in gateways if c.running)
            await attach_decisions(f"http://{survivor}", DEMO_KEY, records)
        finally:
            if kill_task is not None:
                kill_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await kill_task
            if lb is not None:
                lb.stop()
            for child, _ in gateways:
                child.stop()
        stats = await emulator.stats()

    entries = lb.entries() if lb is not None else []
    kill = None
    if killed is not None:
        kill = kill_report(
            records, entries, killed=gateways[victim][1], replica=victim, kill=killed
        )
    result = summarise(
        spec, setup, requests, records, entries, [a for _, a in gateways], stats, counters, kill, t0
    )
    result.replay_seconds = replay_seconds
    result.cpu = {k: round(v, 1) for k, v in cpu.items() if pids.get(k, [0])}
    result.redis = {k: v - redis0.get(k, 0.0) for k, v in redis1.items() if v != redis0.get(k)}
    result.warnings = dict(log_warnings([c.log_path for c, _ in gateways]).most_common(6))
    return result


def kill_delay(requests: Sequence[TraceRequest], setup: Setup, share: float) -> float:
    """Seconds from the replay's start to the kill: just after the first requests due at
    ``share`` of the trace's span were sent (bench.common.send_all sends at ``at``, scaled)."""
    first, last = requests[0].at, requests[-1].at
    due = next((r.at for r in requests if r.at >= first + share * (last - first)), last)
    return setup.scaled(due) + KILL_AFTER_SEND


def readyz_check(session: aiohttp.ClientSession, addr: str) -> Callable[[], Awaitable[bool]]:
    return lambda: http_ok(session, f"http://{addr}/readyz")


async def _kill_later(child: Child, delay: float, t_start: float) -> Kill:
    """SIGKILL ``child`` ``delay`` seconds after ``t_start``; wait until it has exited."""
    await asyncio.sleep(max(0.0, t_start + delay - time.monotonic()))
    proc = child.proc
    assert proc is not None

    def wait_exit() -> float:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        return time.time()

    cpu = proc_cpu(child.pid)
    offset, signalled = time.monotonic() - t_start, time.time()
    child.kill()
    exited = await asyncio.to_thread(wait_exit)
    return Kill(signalled, exited, offset, cpu)


def summarise(
    spec: RowSpec,
    setup: Setup,
    requests: Sequence[TraceRequest],
    records: Sequence[Record],
    entries: Sequence[LbEntry],
    addrs: Sequence[str],
    stats: dict[str, Any],
    counters: Sequence[dict[str, float]],
    kill: KillReport | None,
    t0: float,
) -> Result:
    per = stats["accounts"]
    losses = routing_loss(requests, records, setup.time_scale)
    ok = [r for r in records if r.ok]
    e2e = [r.done - r.last for r in ok]
    late = [max(0.0, r.sent - r.due) for r in records]
    accounts = Counter(r.account for r in ok)
    if entries:
        by_id = {e.gateway_id: e.replica for e in entries if e.gateway_id}
        replicas = Counter(by_id.get(r.request_id, "") for r in ok)
        per_replica = [replicas.get(a, 0) for a in addrs]
    else:
        per_replica = [len(ok)]
    decisions: Counter[str] = Counter()
    for c in counters:
        for k, v in c.items():
            if k.startswith("decision:"):
                decisions[k.removeprefix("decision:")] += int(v)
    fallbacks = None
    if spec.redis and counters:
        fallbacks = int(sum(c.get("redis_fallbacks", 0.0) for c in counters))
    return Result(
        row=spec.name,
        replicas=spec.replicas,
        state="redis" if spec.redis else "embedded",
        requests=len(records),
        ok=len(ok),
        errors=len(records) - len(ok),
        shed=sum(1 for r in records if r.error == "saturated"),
        retried=sum(1 for r in records if r.retries),
        prompt_tokens=sum(a["prompt_tokens"] for a in per.values()),
        cached_tokens=sum(a["cached_tokens"] for a in per.values()),
        upstream_429=sum(a["rate_limited"] for a in per.values()),
        over_limit=over_limit(records, setup.limits, setup.time_scale),
        routing_loss=sum(losses.values()),
        loss_by_decision={k or "unknown": v for k, v in losses.most_common() if v},
        failures=dict(Counter(r.error or f"status {r.status}" for r in records if not r.ok)),
        peak_ratio=peak_ratio(records, setup.time_scale, setup.accounts),
        p50_ms=_percentile(e2e, 50) * 1000,
        p99_ms=_percentile(e2e, 99) * 1000,
        late_p99_ms=_percentile(late, 99) * 1000,
        seconds=time.monotonic() - t0,
        per_replica=per_replica,
        per_account=[accounts.get(f"openai-{i}", 0) for i in range(setup.accounts)],
        redis_fallbacks=fallbacks,
        decisions=dict(decisions.most_common()),
        kill=kill,
    )


# --- the report ------------------------------------------------------------------------------

HEADERS = [
    "row",
    "replicas",
    "state",
    "requests",
    "errors",
    "in flight on killed",
    "failed of those",
    "lost beyond",
    "hit rate",
    "vs single",
    "lost to routing",
    "429 upstream",
    "over limit",
    "peak/mean",
    "redis fallbacks",
    "p50 ms",
    "p99 ms",
    "late p99",
    "requests per replica",
]


def table(results: Sequence[Result]) -> str:
    base = next((r for r in results if r.row == "single"), None)

    def delta(r: Result) -> str:
        if base is None or r is base:
            return "-"
        return f"{(r.hit_rate - base.hit_rate) * 100:+.1f} pt"

    rows = []
    for r in results:
        k = r.kill
        rows.append(
            [
                r.row,
                r.replicas,
                r.state,
                r.requests,
                r.errors,
                "-" if k is None else k.in_flight,
                "-" if k is None else k.failed_in_flight,
                r.lost,
                f"{r.hit_rate:.1%}",
                delta(r),
                f"{r.routing_loss / r.prompt_tokens:.1%}" if r.prompt_tokens else "-",
                r.upstream_429,
                r.over_limit,
                f"{r.peak_ratio:.2f}",
                "-" if r.redis_fallbacks is None else r.redis_fallbacks,
                f"{r.p50_ms:.0f}",
                f"{r.p99_ms:.0f}",
                f"{r.late_p99_ms:.0f}",
                " ".join(str(n) for n in r.per_replica),
            ]
        )
    return render(HEADERS, rows)


def notes(results: Sequence[Result], time_scale: float) -> list[str]:
    lines = []
    for r in results:
        k = r.kill
        if k is not None:
            lines.append(
                f"{r.row}: replica {k.replica} killed (SIGKILL) {k.at_seconds:.1f} s into the "
                f"run, gone {(k.exited - k.signalled) * 1000:.0f} ms later; {k.in_flight} "
                f"requests in flight on it (LB log: {k.in_flight_at_signal} at the signal, "
                f"{k.in_flight - k.in_flight_at_signal} handed to it while it was dying), "
                f"{k.in_flight_all} in "
                f"flight on all replicas (client); {r.errors} client failures: "
                f"{k.failed_in_flight} of them in flight on the killed replica, "
                f"{k.failed_beyond} beyond"
            )
            if k.unlogged:
                lines.append(
                    f"{r.row}: {k.unlogged} failures are not in the LB log (counted as lost "
                    f"beyond); {k.unlogged_in_flight} of them were in flight at the kill (sent "
                    "before the replica's exit was seen, unanswered at the signal); failures "
                    "sent at (ms from the signal): "
                    + " ".join(f"{t:g}" for t in k.failures_sent_ms)
                )
        if r.failures:
            kinds = ", ".join(f"{k} {v}" for k, v in r.failures.items())
            lines.append(f"{r.row} client failures: {kinds}")
        if r.shed or r.retried:
            lines.append(
                f"{r.row}: {r.retried} requests answered 429 (saturated) and retried, "
                f"{r.shed} still saturated after every retry"
            )
    for r in results:
        if r.cpu:
            busy = sum(r.cpu.values())
            parts = ", ".join(f"{k} {v:.0f}" for k, v in r.cpu.items())
            lines.append(
                f"{r.row} CPU seconds over the {r.replay_seconds:.0f} s replay: {parts}; "
                f"{busy / r.replay_seconds:.2f} of {os.cpu_count()} CPUs busy"
                + (" (other: this machine's other processes)" if r.cpu.get("other", 0) > 1 else "")
            )
        if r.redis.get("evalsha_calls"):
            calls = r.redis["evalsha_calls"]
            failed = ", ".join(
                f"{k.partition(':')[2]} {v:.0f}" for k, v in r.redis.items() if k.startswith("fail")
            )
            lines.append(
                f"{r.row} Redis: {calls:.0f} script calls, "
                f"{r.redis.get('evalsha_usec', 0) / calls:.0f} us each in Redis; "
                f"failed commands: {failed or 'none'}"
            )
        for message, count in r.warnings.items():
            lines.append(f"{r.row} gateway log: {count} x {message}")
    for r in results:
        if r.decisions:
            reasons = ", ".join(f"{k} {v}" for k, v in r.decisions.items())
            survivors = " (surviving replicas)" if r.kill is not None else ""
            lines.append(f"{r.row} decisions{survivors}: {reasons}")
        if r.loss_by_decision and r.prompt_tokens:
            losses = ", ".join(
                f"{k} {v / r.prompt_tokens:.1%}" for k, v in r.loss_by_decision.items()
            )
            lines.append(f"{r.row} lost to routing, by decision: {losses}")
    lines.extend(
        f"{r.row} requests per account: {' '.join(map(str, r.per_account))}" for r in results
    )
    worst = max((r.late_p99_ms for r in results), default=0.0)
    if worst / 1000 * time_scale > WINDOW_SECONDS / 4:
        lines.append(
            f"warning: the client sent requests up to {worst:.0f} ms late (p99), "
            f"{worst / 1000 * time_scale:.0f} emulated seconds: the machine did not keep up "
            "with this time scale, so load was burstier than the trace's. Lower --time-scale."
        )
    return lines


def targets(results: Sequence[Result]) -> list[str]:
    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    out = []
    base = next((r for r in results if r.row == "single"), None)
    multi = [r for r in results if r.replicas > 1]
    if base is not None and multi:
        gaps = {r.row: (base.hit_rate - r.hit_rate) * 100 for r in multi}
        worst = max(gaps.values())
        shown = ", ".join(f"{k} {-v:+.1f} pt" for k, v in gaps.items())
        out.append(
            f"replica hit rate within {TARGET_HIT_POINTS:g} points of the single gateway "
            f"({base.hit_rate:.1%}): {shown}, {mark(worst <= TARGET_HIT_POINTS)}"
        )
    over = {r.row: (r.upstream_429, r.over_limit) for r in results}
    shown = ", ".join(f"{k} {a}/{b}" for k, (a, b) in over.items())
    out.append(
        f"no account over its limits (429s from the provider / over a limit in the client's "
        f"count): {shown}, {mark(all(a == 0 and b == 0 for a, b in over.values()))}"
    )
    lost = {r.row: r.lost for r in results}
    shown = ", ".join(f"{k} {v}" for k, v in lost.items())
    out.append(
        "no request lost beyond those in flight on the killed replica: "
        f"{shown}, {mark(all(v == 0 for v in lost.values()))}"
    )
    return out


# --- the run ---------------------------------------------------------------------------------


async def run_all(
    specs: Sequence[RowSpec],
    requests: Sequence[TraceRequest],
    setup: Setup,
    *,
    lb: tuple[str, str],
    redis_timeout: float,
    kill_at: float,
    keep: bool,
    log: Callable[[str], None],
) -> list[Result]:
    """Every row in turn; whatever happens, every process and the work directory go."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    workdir = Path(tempfile.mkdtemp(prefix="affinity-scaleout-"))
    redis: Child | None = None
    results: list[Result] = []
    try:
        redis_url = ""
        if any(s.redis for s in specs):
            redis, port = redis_child(workdir)
            redis.start()
            await wait_ready(redis, lambda: _tcp_open(port))
            redis_url = f"redis://{HOST}:{port}/0"
        ctx = Context(
            requests=requests,
            setup=setup,
            texts=BlockText(),
            workdir=workdir,
            lb_kind=lb[0],
            lb_binary=lb[1],
            redis_url=redis_url,
            redis_pid=redis.pid if redis is not None else None,
            redis_timeout=redis_timeout,
            kill_at=kill_at,
            run_id=f"{os.getpid()}-{int(time.time())}",
            log=log,
        )
        for spec in specs:
            log(
                f"{spec.name}: {spec.replicas} gateway process(es), "
                f"{'Redis' if spec.redis else 'embedded'} state"
                f"{', behind ' + lb[0] if spec.lb else ''}{', one killed' if spec.kill else ''}"
            )
            result = await run_row(spec, ctx)
            log(
                f"  {spec.name}: done in {result.seconds:.0f} s, hit rate {result.hit_rate:.1%}, "
                f"{result.errors} errors"
            )
            results.append(result)
    finally:
        if redis is not None:
            redis.stop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGTERM)
        if keep:
            log(f"logs and configurations kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return results


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.scaleout",
        description="The Mooncake trace through one gateway and through replicas behind a "
        "load balancer (one of them killed), side by side.",
    )
    p.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="Mooncake-format JSONL")
    p.add_argument("--limit", type=int, help="replay only the first N requests")
    p.add_argument(
        "--time-scale",
        type=float,
        default=DEFAULT_TIME_SCALE,
        help=f"emulated seconds per real second (default {DEFAULT_TIME_SCALE:g})",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=DEFAULT_REPLICAS,
        help=f"gateway processes behind the load balancer (default {DEFAULT_REPLICAS})",
    )
    p.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from %(default)s")
    p.add_argument(
        "--lb",
        choices=("auto", *LB_KINDS),
        default="auto",
        help="load balancer (default: the first of nginx, haproxy installed)",
    )
    p.add_argument(
        "--redis-timeout",
        type=float,
        default=DEFAULT_REDIS_TIMEOUT,
        help="the gateways' state.redis_socket_timeout, seconds (default %(default)s)",
    )
    p.add_argument(
        "--kill-at",
        type=float,
        default=DEFAULT_KILL_AT,
        help="when to kill a replica, as a share of the run (default 1/3)",
    )
    p.add_argument("--accounts", type=int, default=8, help="accounts in the pool (default 8)")
    p.add_argument(
        "--load",
        type=float,
        default=0.7,
        help="pool load in the busiest minute that sets the limits (default 0.7)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight at most (default {DEFAULT_CONCURRENCY})",
    )
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--keep", action="store_true", help="keep the logs and configurations")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    t0 = time.monotonic()
    args = parser().parse_args(argv)
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    if not names or any(n not in ROWS for n in names):
        parser().error(f"--rows: choose from {', '.join(ROWS)}")
    if args.replicas < 2 or args.accounts < 1 or args.time_scale <= 0:
        parser().error("--replicas must be >= 2, --accounts >= 1 and --time-scale > 0")
    if not 0 < args.load <= 1 or not 0 < args.kill_at < 1 or args.redis_timeout <= 0:
        parser().error("--load must be in (0, 1], --kill-at in (0, 1), --redis-timeout > 0")
    specs = row_specs(names, args.replicas)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    try:
        lb = pick_lb(args.lb) if any(s.lb for s in specs) else ("", "")
        if any(s.redis for s in specs) and find_binary("redis-server") is None:
            raise Unavailable("redis-server is not installed (apt-get install -y redis-server)")
    except Unavailable as exc:
        print(f"cannot run: {exc}", file=sys.stderr)
        return 2

    requests = load_trace(args.trace, limit=args.limit)
    if len(requests) < 2:
        parser().error(f"{args.trace}: fewer than 2 requests")
    peak = peak_minute(requests)
    limits = limits_for(peak, args.accounts, args.load)
    setup = Setup(
        accounts=args.accounts,
        limits=limits,
        time_scale=args.time_scale,
        concurrency=args.concurrency,
    )
    span = requests[-1].at - requests[0].at
    tokens = sum(r.input_tokens for r in requests)
    print(
        f"trace {args.trace.name}: {len(requests):,} requests, {tokens / 1e6:.1f} M input "
        f"tokens over {span:,.0f} s; busiest minute {peak.requests} requests, "
        f"{peak.input_tokens / 1e6:.2f} M input tokens\n"
        f"{args.accounts} accounts, each rpm {limits.rpm}, itpm {limits.itpm:,} (pool at "
        f"{args.load:.0%} in the busiest minute); cache TTL {CACHE_TTL_SECONDS:g} s, window "
        f"{WINDOW_SECONDS:g} s, minimum {MIN_CACHE_TOKENS} tokens; output capped at "
        f"{MAX_OUTPUT_TOKENS} tokens; time scale {args.time_scale:g} "
        f"(~{span / args.time_scale:.0f} s a row)\n"
        f"replica rows: {args.replicas} gateway processes behind {lb[0] or '-'} (round "
        f"robin), Redis socket timeout {args.redis_timeout * 1000:g} ms; "
        f"{os.cpu_count()} CPUs\n",
        flush=True,
    )
    try:
        results = asyncio.run(
            run_all(
                specs,
                requests,
                setup,
                lb=lb,
                redis_timeout=args.redis_timeout,
                kill_at=args.kill_at,
                keep=args.keep,
                log=log,
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; every process started was stopped", file=sys.stderr)
        return 130
    except (StartError, Unavailable) as exc:
        print(f"failed: {exc}", file=sys.stderr)
        return 2

    print(table(results))
    print()
    for line in notes(results, args.time_scale):
        print(line)
    print()
    for line in targets(results):
        print(line)
    elapsed = time.monotonic() - t0
    print(f"\ndone in {elapsed:.0f} s")
    if args.json is not None:
        doc = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "lb": lb[0],
            "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "limits": {"rpm": limits.rpm, "itpm": limits.itpm},
            "seconds": elapsed,
            "rows": [{**asdict(r), "hit_rate": r.hit_rate, "lost": r.lost} for r in results],
        }
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
    return 0 if all(r.lost == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
