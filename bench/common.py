"""Shared machinery of the end-to-end benchmarks (bench.replay, bench.hot_prefix).

A benchmark is a list of timed requests, each a chain of prompt blocks. For every policy
it starts a fresh provider emulator (cold caches; in a child process, as a provider is
remote) and a fresh gateway (uvicorn in this process, like the demo); a client process
sends the requests over real HTTP at their (time-compressed) timestamps, open loop, and
the provider's side of the story comes from the emulator's ``GET /stats``. Everything the client
saw (status, upstream account, usage, timings, the gateway's request id) is recorded
per request, so per-account, per-minute load is reconstructed from what was admitted.

Time compression: request i is sent at ``at_i / time_scale`` real seconds. The
emulator divides its TTLs, windows and latencies by ``time_scale`` itself; the gateway
is given its cache TTL and window already divided.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import logging
import math
import multiprocessing
import random
import socket
import statistics
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from gateway.table import render

if TYPE_CHECKING:
    from gateway.emulator import EmulatorConfig, EmulatorServer
    from gateway.serving import AppServer

# The gateway and the emulator are imported where they run, so that the client's and
# the emulator's processes start without loading the whole gateway.

TRACES = Path(__file__).parent / "traces"
MOONCAKE_TRACE = TRACES / "mooncake_conversation_trace.jsonl"

TRACE_BLOCK_TOKENS = 512  # Mooncake: one hash id per 512-token block
BYTES_PER_TOKEN = 4  # the emulator's tokenizer (and the gateway's estimate)
BLOCK_BYTES = TRACE_BLOCK_TOKENS * BYTES_PER_TOKEN
MODEL = "gpt-4o-mini"
CHAT_PATH = "/v1/chat/completions"

# Provider geometry of every benchmark, in emulated seconds and tokens.
CACHE_TTL_SECONDS = 300.0
WINDOW_SECONDS = 60.0
MIN_CACHE_TOKENS = 1024
CACHE_BLOCK_TOKENS = 128
# Output does not touch input caching, so it is capped to keep runs short.
MAX_OUTPUT_TOKENS = 64
# Emulated latency (ms): small, so that in-flight counts stay low at high time scales.
LATENCY_BASE_MS = 100.0
LATENCY_PREFILL_MS_PER_1K_UNCACHED = 2.0
LATENCY_DECODE_MS_PER_TOKEN = 4.0
DEMO_KEY = "sk-demo"  # gateway.presets.DEMO_KEY, the key emulated_config accepts

POLICIES = ("round_robin", "random", "affinity", "ideal")
DEFAULT_POLICIES = ("round_robin", "affinity", "ideal")
# The gateway's affinity mode per policy. The gateway has no random mode: "random" is
# its "fixed" mode (the client key's rendezvous order, first account with headroom)
# with a client key drawn at random per request from RANDOM_KEYS keys.
AFFINITY_MODE = {"round_robin": "off", "random": "fixed", "affinity": "prefix", "ideal": "prefix"}
RANDOM_KEYS = 256

# A saturated gateway answers 429 with Retry-After; the client retries like an SDK would.
MAX_RETRIES = 6


# --- the workload ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request: when (emulated seconds from the start) and its chain of blocks.

    ``blocks`` are 512-token block ids in prompt order (the last may be partial).
    """

    at: float
    input_tokens: int
    output_tokens: int
    blocks: tuple[int, ...]


def load_trace(path: Path = MOONCAKE_TRACE, *, limit: int | None = None) -> list[TraceRequest]:
    """Read a Mooncake-format trace: timestamp (ms), input_length, output_length, hash_ids."""
    out: list[TraceRequest] = []
    with path.open("rb") as lines:
        for line in lines:
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            row = orjson.loads(line)
            out.append(
                TraceRequest(
                    row["timestamp"] / 1000.0,
                    int(row["input_length"]),
                    int(row["output_length"]),
                    tuple(row["hash_ids"]),
                )
            )
    out.sort(key=lambda r: r.at)
    return out


class BlockText:
    """Deterministic ~512-token texts for block ids.

    Block ``i`` is its id in hex (16 characters) followed by 2,032 characters of a
    fixed pseudo-random base64 pool, read at an offset the id picks: 2,048 ASCII
    characters, 512 emulator tokens, no JSON escaping. The id at the front makes every
    block's bytes differ from the first character on, and both the provider's cache and
    the gateway's fingerprint chain their block hashes, so two prompts share a cacheable
    prefix exactly as far as their block ids agree. A block costs one slice, cheaper
    than any memo lookup, so ids that repeat need no cache.
    """

    POOL_BYTES = 1 << 20

    def __init__(self, seed: int = 0) -> None:
        raw = random.Random(seed).randbytes(self.POOL_BYTES * 3 // 4)
        self._pool = base64.b64encode(raw).decode("ascii")
        self._span = len(self._pool) - BLOCK_BYTES

    def block(self, block_id: int) -> str:
        head = f"{block_id & 0xFFFF_FFFF_FFFF_FFFF:016x}"
        offset = (block_id * 0x9E37_79B9_7F4A_7C15 >> 7) % self._span
        return head + self._pool[offset : offset + BLOCK_BYTES - len(head)]

    def prompt(self, request: TraceRequest) -> str:
        """The blocks joined; the last is cut so the prompt has ``input_tokens`` tokens."""
        blocks = request.blocks
        if not blocks:
            return ""
        head = [self.block(b) for b in blocks[:-1]]
        last_tokens = request.input_tokens - TRACE_BLOCK_TOKENS * (len(blocks) - 1)
        last_tokens = min(max(last_tokens, 1), TRACE_BLOCK_TOKENS)
        head.append(self.block(blocks[-1])[: last_tokens * BYTES_PER_TOKEN])
        return "".join(head)


def request_body(request: TraceRequest, texts: BlockText, *, max_output: int) -> bytes:
    """One chat-completions body: the whole prompt as a single user message."""
    return orjson.dumps(
        {
            "model": MODEL,
            "max_tokens": max(1, min(request.output_tokens, max_output)),
            "messages": [{"role": "user", "content": texts.prompt(request)}],
        }
    )


# --- limits --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeakMinute:
    requests: int
    input_tokens: int


def peak_minute(requests: Sequence[TraceRequest]) -> PeakMinute:
    """The busiest emulated minute by requests, and by input tokens (each on its own)."""
    count: Counter[int] = Counter()
    tokens: Counter[int] = Counter()
    for r in requests:
        minute = int(r.at // 60)
        count[minute] += 1
        tokens[minute] += r.input_tokens
    return PeakMinute(max(count.values(), default=0), max(tokens.values(), default=0))


@dataclass(frozen=True, slots=True)
class AccountLimits:
    rpm: int
    itpm: int

    def times(self, n: int) -> AccountLimits:
        return AccountLimits(self.rpm * n, self.itpm * n)


def limits_for(peak: PeakMinute, accounts: int, load: float = 0.7) -> AccountLimits:
    """Per-account limits under which the pool runs at ``load`` in the peak minute."""
    return AccountLimits(
        rpm=max(1, math.ceil(peak.requests / (load * accounts))),
        itpm=max(1, math.ceil(peak.input_tokens / (load * accounts))),
    )


# --- one run -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setup:
    accounts: int
    limits: AccountLimits  # per account of the pool
    time_scale: float
    concurrency: int = 64
    max_output: int = MAX_OUTPUT_TOKENS
    tuning: dict[str, Any] = field(default_factory=dict)  # extra gateway `affinity` settings

    def scaled(self, seconds: float) -> float:
        return seconds / self.time_scale


@dataclass(slots=True)
class Record:
    """What the client saw of one request (times in real seconds from the run's start)."""

    due: float  # when the trace says to send it
    sent: float = 0.0  # first attempt
    last: float = 0.0  # last attempt
    done: float = 0.0  # last attempt answered
    status: int = 0
    account: str = ""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    error: str = ""
    request_id: str = ""  # the gateway's x-request-id
    decision: str = ""  # the gateway's routing decision, from its usage log

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


@dataclass(slots=True)
class Row:
    policy: str
    requests: int
    ok: int
    prompt_tokens: int  # provider-reported (emulator /stats)
    cached_tokens: int
    upstream_429: int  # rate-limit answers from the emulator's accounts
    over_limit: int  # admissions past an account's limit, reconstructed from the records
    routing_loss: int  # input tokens cached on another account than the one chosen
    peak_ratio: float  # busiest account's busiest minute / mean of the accounts' busiest
    p50_ms: float  # end-to-end
    p99_ms: float
    added_p50_ms: float  # end-to-end minus the emulator's own modelled latency
    added_p99_ms: float
    late_p99_ms: float  # how late the client sent, p99
    retried: int  # requests the gateway answered 429 (saturated) at least once
    shed: int  # still saturated after every retry
    errors: int  # anything else that was not a 200
    seconds: float
    per_account: list[int] = field(default_factory=list)  # admitted requests per account
    decisions: Counter[str] = field(default_factory=Counter)  # the gateway's, by reason
    loss_by_decision: Counter[str] = field(default_factory=Counter)  # routing loss, by reason
    ideal_hit_rate: float | None = None

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def no_delay(server: AppServer | EmulatorServer) -> None:
    """Turn Nagle's algorithm off on an in-process server's listening sockets.

    ``AppServer`` and ``EmulatorServer`` bind with ``socket.create_server``, whose
    sockets (protocol 0) asyncio leaves with Nagle on; uvicorn writes a response's head
    and body separately, so every exchange on a kept-alive connection then waits ~40 ms
    for the peer's delayed ACK. Accepted sockets inherit the option on Linux. The CLI's
    ``serve`` binds through uvicorn and is not affected.
    """
    inner = getattr(server, "_server", None)
    for listener in getattr(inner, "servers", ()):
        for sock in listener.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _serve_emulator(config: EmulatorConfig, conn: Connection) -> None:
    """The child process: the emulator on uvicorn until the parent says stop."""
    from gateway.emulator import EmulatorServer

    for name in ("uvicorn", "gateway"):
        logging.getLogger(name).setLevel(logging.WARNING)

    async def serve() -> None:
        async with EmulatorServer(config) as server:
            no_delay(server)
            conn.send(server.url)
            await asyncio.get_running_loop().run_in_executor(None, conn.recv)

    try:
        asyncio.run(serve())
    finally:
        conn.close()


class EmulatorProcess:
    """The provider emulator in a child process of its own, as a provider is remote.

    The gateway and the client share this process's event loop; the emulator's CPU
    time (prompt hashing, cache lookups) then neither delays the gateway nor counts as
    gateway latency, and a 2-core machine uses both cores.
    """

    def __init__(self, config: EmulatorConfig, *, start_timeout: float = 60.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.url = ""
        self._conn: Connection | None = None
        self._process: BaseProcess | None = None

    async def __aenter__(self) -> EmulatorProcess:
        if not self.url:
            await self.start()
        return self

    async def start(self) -> None:
        """Start the process and wait for its URL (``async with`` does it if needed)."""
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        process = context.Process(
            target=_serve_emulator, args=(self.config, child), name="emulator", daemon=True
        )
        process.start()
        child.close()
        self._conn, self._process = parent, process
        loop = asyncio.get_running_loop()
        try:
            if not await loop.run_in_executor(None, parent.poll, self.start_timeout):
                raise RuntimeError("the emulator process did not start")
            self.url = parent.recv()
        except BaseException:
            await self.stop()
            raise

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stats(self) -> dict[str, Any]:
        """The emulator's ``GET /stats``."""
        async with aiohttp.ClientSession() as session, session.get(self.url + "/stats") as r:
            r.raise_for_status()
            data: dict[str, Any] = await r.json()
            return data

    async def stop(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        self.url = ""
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.send("stop")
            conn.close()
        if process is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, process.join, 10.0)
            if process.is_alive():
                process.terminate()
                await loop.run_in_executor(None, process.join, 5.0)
            process.close()


def emulator_config(setup: Setup, accounts: int, limits: AccountLimits) -> EmulatorConfig:
    from gateway.emulator import AccountSpec, EmulatorConfig, LatencySpec

    return EmulatorConfig(
        accounts=[
            AccountSpec(name=f"acct-{i}", key=f"sk-emu-{i}", rpm=limits.rpm, itpm=limits.itpm)
            for i in range(accounts)
        ],
        time_scale=setup.time_scale,
        cache_ttl_seconds=CACHE_TTL_SECONDS,
        window_seconds=WINDOW_SECONDS,
        min_cache_tokens=MIN_CACHE_TOKENS,
        cache_block_tokens=CACHE_BLOCK_TOKENS,
        max_output_tokens=max(setup.max_output, 1),
        latency=LatencySpec(
            base_ms=LATENCY_BASE_MS,
            prefill_ms_per_1k_uncached=LATENCY_PREFILL_MS_PER_1K_UNCACHED,
            decode_ms_per_token=LATENCY_DECODE_MS_PER_TOKEN,
        ),
    )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def _retry_after(headers: Any, cap: float) -> float:
    try:
        value = float(headers.get("retry-after", "1"))
    except ValueError:
        value = 1.0
    return min(max(value, 0.0), cap)


async def send_all(
    base_url: str,
    requests: Sequence[TraceRequest],
    setup: Setup,
    *,
    texts: BlockText | None = None,
    keys: Sequence[str] = (DEMO_KEY,),
    on_progress: Callable[[int], None] | None = None,
) -> list[Record]:
    """Send every request at ``at / time_scale``, open loop, at most ``concurrency`` in
    flight; the records come back in request order.

    A request waiting for a free slot is late; a request the gateway answers 429
    (no account has headroom) is retried after Retry-After, outside the slot. Each
    request uses one of ``keys``, drawn by a seeded generator.
    """
    texts = texts or BlockText()
    gate = asyncio.Semaphore(setup.concurrency)
    draw = random.Random(len(requests))
    key_headers = [
        {"authorization": f"Bearer {key}", "content-type": "application/json"} for key in keys
    ]
    records = [Record(due=setup.scaled(r.at)) for r in requests]
    # The gateway's Retry-After is whole seconds: cap the wait at a quarter of the
    # (real) window, so that a compressed run does not idle for emulated minutes.
    retry_cap = setup.scaled(WINDOW_SECONDS) / 4
    clock = time.monotonic
    url = base_url + CHAT_PATH

    async def attempt(
        session: aiohttp.ClientSession, body: bytes, headers: dict[str, str], rec: Record
    ) -> float | None:
        """One HTTP exchange; the seconds to wait before retrying, or None when done."""
        async with gate:
            rec.last = clock() - started
            if not rec.retries:
                rec.sent = rec.last
            async with session.post(url, data=body, headers=headers) as r:
                data = await r.read()
                rec.done = clock() - started
                rec.status = r.status
                rec.account = r.headers.get("x-upstream-account", "")
                rec.request_id = r.headers.get("x-request-id", "")
        if rec.status == 429 and not rec.account:
            return _retry_after(r.headers, retry_cap)  # saturated: no account had headroom
        if rec.status != 200:
            rec.error = f"status {rec.status}"
            return None
        usage = orjson.loads(data).get("usage") or {}
        rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
        details = usage.get("prompt_tokens_details") or {}
        rec.cached_tokens = int(details.get("cached_tokens", 0) or 0)
        rec.output_tokens = int(usage.get("completion_tokens", 0))
        return None

    async def one(
        session: aiohttp.ClientSession,
        request: TraceRequest,
        headers: dict[str, str],
        rec: Record,
    ) -> None:
        body = request_body(request, texts, max_output=setup.max_output)
        try:
            while (wait := await attempt(session, body, headers, rec)) is not None:
                if rec.retries >= MAX_RETRIES:
                    rec.error = "saturated"
                    return
                rec.retries += 1
                await asyncio.sleep(wait)
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            rec.error = type(exc).__name__

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = clock()
        # Only the requests in flight are held, so finished ones can be freed.
        pending: set[asyncio.Task[None]] = set()
        for index, (request, rec) in enumerate(zip(requests, records, strict=True)):
            delay = rec.due - (clock() - started)
            if delay > 0:
                await asyncio.sleep(delay)
            headers = key_headers[draw.randrange(len(key_headers))]
            task = asyncio.create_task(one(session, request, headers, rec))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if on_progress is not None and index and index % 1000 == 0:
                on_progress(index)
        while pending:  # a request that failed unexpectedly keeps status 0: an error
            await asyncio.gather(*pending, return_exceptions=True)
    return records


def minute_of(rec: Record, time_scale: float) -> int:
    """The emulated minute an answered request was admitted in (its last attempt)."""
    return int(rec.last * time_scale // 60)


def over_limit(records: Sequence[Record], limits: AccountLimits, time_scale: float) -> int:
    """Requests an account admitted after its emulated minute had reached rpm or itpm.

    Reconstructed from what the client recorded: the account that answered
    (``x-upstream-account``), the usage it reported and when the request was sent.
    Whole minutes, not the provider's sliding window: robust to the few milliseconds
    between the client's clock and the provider's, and never above the sliding count.
    """
    requests: Counter[tuple[str, int]] = Counter()
    tokens: Counter[tuple[str, int]] = Counter()
    over = 0
    for rec in sorted((r for r in records if r.ok), key=lambda r: r.last):
        cell = (rec.account, minute_of(rec, time_scale))
        requests[cell] += 1
        tokens[cell] += rec.prompt_tokens
        if requests[cell] > limits.rpm or tokens[cell] > limits.itpm:
            over += 1
    return over


def peak_ratio(records: Sequence[Record], time_scale: float, accounts: int) -> float:
    """Busiest account's busiest emulated minute of input tokens over the accounts' mean."""
    minutes: dict[str, Counter[int]] = defaultdict(Counter)
    for rec in records:
        if rec.ok:
            minutes[rec.account][minute_of(rec, time_scale)] += rec.prompt_tokens
    peaks = [max(m.values()) for m in minutes.values()]
    peaks += [0] * (accounts - len(peaks))
    mean = sum(peaks) / len(peaks) if peaks else 0.0
    return max(peaks) / mean if mean else 0.0


async def attach_decisions(base_url: str, key: str, records: Sequence[Record]) -> None:
    """Each record's routing decision, from the gateway's usage log (GET /v1/usage/logs).

    Best effort: a gateway without the endpoint leaves the decisions empty.
    """
    by_id = {r.request_id: r for r in records if r.request_id}
    headers = {"authorization": f"Bearer {key}"}
    cursor: str | None = None
    async with aiohttp.ClientSession() as session:
        while by_id:
            params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
            async with session.get(
                base_url + "/v1/usage/logs", params=params, headers=headers
            ) as r:
                if r.status != 200:
                    return
                page = await r.json(loads=orjson.loads)
            for entry in page.get("data", ()):
                rec = by_id.pop(str(entry.get("request_id", "")), None)
                if rec is not None:
                    rec.decision = str(entry.get("decision", ""))
            cursor = page.get("next_cursor")
            if not cursor:
                return


def routing_loss(
    requests: Sequence[TraceRequest], records: Sequence[Record], time_scale: float
) -> Counter[str]:
    """Input tokens another account held in its cache when the request went elsewhere.

    A model of the provider's caches, fed with what the client saw: each answered
    request, in the order it was sent, refreshes its whole block chain on the account
    that answered it (sliding TTL). For each request, the longest live prefix on any
    account minus the one on the account chosen is what the routing decision gave up;
    what no account held was lost to expiry or never cached, and no router can win it.
    The loss is counted by the gateway's decision for the request ("" if unknown).
    """
    ttl = CACHE_TTL_SECONDS
    caches: dict[str, dict[int, float]] = defaultdict(dict)
    order = sorted((i for i, r in enumerate(records) if r.ok), key=lambda i: records[i].last)

    def live(cache: dict[int, float], blocks: tuple[int, ...], now: float) -> int:
        lo, hi, deepest = 0, len(blocks) - 1, -1
        while lo <= hi:  # every request writes its whole chain: liveness is monotone
            mid = (lo + hi) >> 1
            if cache.get(blocks[mid], 0.0) > now:
                deepest, lo = mid, mid + 1
            else:
                hi = mid - 1
        return deepest + 1

    lost: Counter[str] = Counter()
    for i in order:
        request, rec = requests[i], records[i]
        now = rec.last * time_scale
        blocks = request.blocks
        depth = {name: live(cache, blocks, now) for name, cache in caches.items()}
        best = max(depth.values(), default=0)
        got = depth.get(rec.account, 0)

        def tokens(n: int, request: TraceRequest = request) -> int:
            cached = min(n * TRACE_BLOCK_TOKENS, request.input_tokens)
            return cached if cached >= MIN_CACHE_TOKENS else 0

        if best > got:
            lost[rec.decision] += tokens(best) - tokens(got)
        cache = caches[rec.account]
        for block in blocks:
            cache[block] = now + ttl
    return lost


def modelled_latency(rec: Record, time_scale: float) -> float:
    """The emulator's own latency for this answer, real seconds (no queueing or CPU)."""
    uncached = rec.prompt_tokens - rec.cached_tokens
    ms = (
        LATENCY_BASE_MS
        + LATENCY_PREFILL_MS_PER_1K_UNCACHED * uncached / 1000
        + LATENCY_DECODE_MS_PER_TOKEN * rec.output_tokens
    )
    return ms / 1000 / time_scale


def _client_main(
    url: str,
    requests: Sequence[TraceRequest],
    setup: Setup,
    keys: Sequence[str],
    label: str | None,
) -> list[Record]:
    """The client process: the whole workload against the gateway at ``url``."""
    started = time.monotonic()

    def progress(i: int) -> None:
        elapsed = time.monotonic() - started
        print(f"  {label}: {i}/{len(requests)} sent, {elapsed:.0f} s", file=sys.stderr, flush=True)

    on_progress = progress if label is not None else None
    return asyncio.run(send_all(url, requests, setup, keys=keys, on_progress=on_progress))


def policy_emulator(policy: str, setup: Setup) -> EmulatorProcess:
    """The (not yet started) emulator for one policy: the pool, or ideal's one account."""
    if policy == "ideal":
        return EmulatorProcess(emulator_config(setup, 1, setup.limits.times(setup.accounts)))
    return EmulatorProcess(emulator_config(setup, setup.accounts, setup.limits))


async def run_policy(
    policy: str,
    requests: Sequence[TraceRequest],
    setup: Setup,
    client: ProcessPoolExecutor,
    emulator: EmulatorProcess,
    *,
    progress: bool = False,
) -> Row:
    """One policy: a fresh gateway in front of ``emulator`` (started, cold), the requests
    replayed through them by the ``client`` worker; the emulator is stopped after.

    Three processes: the emulator, the gateway (this one, on uvicorn, like the demo)
    and the client, so that neither the client's work nor the emulator's counts as the
    gateway's latency, and a pause in the gateway (a garbage collection, say) shows as
    its latency rather than as a client that sent late.
    """
    from gateway.app import create_app
    from gateway.presets import emulated_config
    from gateway.serving import AppServer

    if policy not in AFFINITY_MODE:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(POLICIES)}")
    accounts = 1 if policy == "ideal" else setup.accounts
    limits = setup.limits.times(setup.accounts) if policy == "ideal" else setup.limits
    tuning = {
        "ttl_seconds": setup.scaled(CACHE_TTL_SECONDS),
        "window_seconds": setup.scaled(WINDOW_SECONDS),
        "min_tokens": MIN_CACHE_TOKENS,
        **setup.tuning,
    }
    keys = [f"sk-random-{i}" for i in range(RANDOM_KEYS)] if policy == "random" else [DEMO_KEY]
    t0 = time.monotonic()
    async with emulator:
        config = emulated_config(
            emulator.url,
            accounts=accounts,
            affinity=AFFINITY_MODE[policy],
            limits={"rpm": limits.rpm, "itpm": limits.itpm},
            tokens={f"client-{i}": key for i, key in enumerate(keys)},
            tuning=tuning,
        )
        app = create_app(config)
        async with AppServer(app) as gateway:
            no_delay(gateway)
            records = await asyncio.get_running_loop().run_in_executor(
                client,
                _client_main,
                gateway.url,
                list(requests),
                setup,
                keys,
                policy if progress else None,
            )
            if len(keys) == 1:
                await attach_decisions(gateway.url, keys[0], records)
        stats = await emulator.stats()
    seconds = time.monotonic() - t0
    per = stats["accounts"]
    losses = routing_loss(requests, records, setup.time_scale)
    ok = [r for r in records if r.ok]
    e2e = [r.done - r.last for r in ok]
    added = [r.done - r.last - modelled_latency(r, setup.time_scale) for r in ok]
    late = [max(0.0, r.sent - r.due) for r in records]
    counts = Counter(r.account for r in ok)
    names = [f"openai-{i}" for i in range(accounts)]
    return Row(
        policy=policy,
        requests=len(records),
        ok=len(ok),
        prompt_tokens=sum(a["prompt_tokens"] for a in per.values()),
        cached_tokens=sum(a["cached_tokens"] for a in per.values()),
        upstream_429=sum(a["rate_limited"] for a in per.values()),
        over_limit=over_limit(records, limits, setup.time_scale),
        routing_loss=sum(losses.values()),
        loss_by_decision=losses,
        peak_ratio=peak_ratio(records, setup.time_scale, accounts),
        p50_ms=_percentile(e2e, 50) * 1000,
        p99_ms=_percentile(e2e, 99) * 1000,
        added_p50_ms=_percentile(added, 50) * 1000,
        added_p99_ms=_percentile(added, 99) * 1000,
        late_p99_ms=_percentile(late, 99) * 1000,
        retried=sum(1 for r in records if r.retries),
        shed=sum(1 for r in records if r.error == "saturated"),
        errors=sum(1 for r in records if not r.ok and r.error != "saturated"),
        seconds=seconds,
        per_account=[counts.get(n, 0) for n in names],
        decisions=Counter(app.router.decisions),
    )


async def run_policies(
    policies: Sequence[str],
    requests: Sequence[TraceRequest],
    setup: Setup,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Row]:
    """Each policy in turn, each on a fresh emulator; ideal's hit rate filled in for all."""
    rows = []
    spawn = multiprocessing.get_context("spawn")
    async with contextlib.AsyncExitStack() as stack:
        client = stack.enter_context(ProcessPoolExecutor(1, mp_context=spawn))
        # Every policy's emulator starts now, in parallel: idle, its caches stay cold.
        emulators = [policy_emulator(policy, setup) for policy in policies]
        for emulator in emulators:
            stack.push_async_callback(emulator.stop)
        warm = asyncio.get_running_loop().run_in_executor(client, time.monotonic)
        await asyncio.gather(warm, *(emulator.start() for emulator in emulators))
        for policy, emulator in zip(policies, emulators, strict=True):
            row = await run_policy(
                policy, requests, setup, client, emulator, progress=log is not None
            )
            rows.append(row)
            if log is not None:
                log(f"  {policy}: done in {row.seconds:.1f} s, hit rate {row.hit_rate:.1%}")
    ideal = next((r.hit_rate for r in rows if r.policy == "ideal"), None)
    for row in rows:
        row.ideal_hit_rate = ideal
    return rows


HEADERS = [
    "policy",
    "hit rate",
    "÷ ideal",
    "lost to routing",
    "429 upstream",
    "over limit",
    "peak/mean",
    "p50 ms",
    "p99 ms",
    "added p50",
    "added p99",
    "late p99",
    "retried",
    "shed",
    "errors",
    "requests per account",
]


def table(rows: Sequence[Row]) -> str:
    def ratio(row: Row) -> str:
        if not row.ideal_hit_rate:
            return "-"
        return f"{row.hit_rate / row.ideal_hit_rate:.2f}"

    return render(
        HEADERS,
        [
            [
                r.policy,
                f"{r.hit_rate:.1%}",
                ratio(r),
                f"{r.routing_loss / r.prompt_tokens:.1%}" if r.prompt_tokens else "-",
                r.upstream_429,
                r.over_limit,
                "-" if len(r.per_account) < 2 else f"{r.peak_ratio:.2f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                f"{r.added_p50_ms:.1f}",
                f"{r.added_p99_ms:.1f}",
                f"{r.late_p99_ms:.1f}",
                r.retried,
                r.shed,
                r.errors,
                " ".join(str(n) for n in r.per_account),
            ]
            for r in rows
        ],
    )


def decisions(rows: Sequence[Row]) -> str:
    """The gateway's routing decisions per policy, most frequent first, and the share of
    input tokens each kind of decision lost to routing."""
    lines = []
    for row in rows:
        if row.decisions:
            reasons = ", ".join(f"{k} {v}" for k, v in row.decisions.most_common())
            lines.append(f"{row.policy} decisions: {reasons}")
        if row.loss_by_decision and row.prompt_tokens and any(row.loss_by_decision):
            losses = ", ".join(
                f"{k} {v / row.prompt_tokens:.1%}"
                for k, v in row.loss_by_decision.most_common()
                if v
            )
            lines.append(f"{row.policy} lost to routing, by decision: {losses}")
    return "\n".join(lines)


def lateness_warning(rows: Sequence[Row], time_scale: float) -> str | None:
    """A warning when the client fell behind the trace by a quarter of the rate window."""
    worst = max((r.late_p99_ms for r in rows), default=0.0)
    emulated = worst / 1000 * time_scale
    if emulated <= WINDOW_SECONDS / 4:
        return None
    return (
        f"warning: the client sent requests up to {worst:.0f} ms late (p99), "
        f"{emulated:.0f} emulated seconds: the machine did not keep up with this time "
        "scale, so load was burstier than the workload's. Lower --time-scale."
    )


def run_and_report(
    policies: Sequence[str],
    requests: Sequence[Any],
    setup: Setup,
    targets: Callable[[Sequence[Row]], list[str]],
    *,
    quiet: bool,
    started: float,
) -> int:
    """Run the policies side by side and print the table, decisions and targets.

    The exit status is non-zero when any request failed."""

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    rows = asyncio.run(run_policies(policies, requests, setup, log=None if quiet else log))
    print(table(rows))
    print()
    print(decisions(rows))
    warning = lateness_warning(rows, setup.time_scale)
    if warning:
        print(warning)
    for line in targets(rows):
        print(line)
    print(f"\ndone in {time.monotonic() - started:.0f} s")
    return 0 if all(r.errors == 0 for r in rows) else 1


def checked_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The policies asked for, after the options the benchmarks share are checked; quiets
    the servers' own logging."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = [p for p in policies if p not in POLICIES]
    if unknown or not policies:
        parser.error(f"unknown policies {unknown}; choose from {', '.join(POLICIES)}")
    if args.accounts < 1 or args.time_scale <= 0 or not 0 < args.load <= 1:
        parser.error("--accounts must be >= 1, --time-scale > 0 and --load in (0, 1]")
    for name in ("uvicorn", "gateway"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return policies
