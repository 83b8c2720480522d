"""`affinity-gateway` command line: serve, check-config, keys, emulate, demo."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType

from gateway.config import ConfigError, load_config
from gateway.keys import hash_key, new_key

log = logging.getLogger("gateway")

_EXIT_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GC_GEN0_THRESHOLD = 10_000  # allocations between young collections (CPython: 700)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _uvicorn_extras() -> dict[str, str]:
    """The fast event loop and HTTP parser when they are installed."""
    extras: dict[str, str] = {}
    try:
        import uvloop  # noqa: F401

        extras["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        extras["http"] = "httptools"
    except ImportError:
        pass
    return extras


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gateway.app import create_app
    from gateway.serving import listen

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"{args.config}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    app = create_app(config, config_path=args.config)
    drain = args.drain_seconds

    delay = args.shutdown_delay

    class DrainingServer(uvicorn.Server):
        """SIGTERM/SIGINT: /readyz answers 503 at once while requests are still served for
        `delay` seconds (load balancers notice), then no new connections; in-flight
        requests get `drain` seconds from the signal, then end with an error event.
        A second signal stops at once."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn re-raises the signal after shutdown (exit status 128+15); a drained
            # shutdown is a clean one, so the CLI exits 0 instead.
            handlers = {s: signal.signal(s, self.handle_exit) for s in _EXIT_SIGNALS}
            try:
                yield
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if app.drain.draining or delay <= 0:
                if not app.drain.draining:
                    app.begin_drain(drain)
                super().handle_exit(sig, frame)
                return
            app.begin_drain(drain)
            stop = super().handle_exit
            asyncio.get_running_loop().call_later(delay, stop, sig, None)

    server = DrainingServer(
        uvicorn.Config(
            app,
            host=args.host or config.server.host,
            port=args.port if args.port is not None else config.server.port,
            access_log=False,
            server_header=False,
            log_level=args.log_level.lower(),
            lifespan="on",
            # uvicorn's own cut comes after ours, so streams end with a terminal event.
            timeout_graceful_shutdown=int(drain) + 3,
            **_uvicorn_extras(),  # type: ignore[arg-type]
        )
    )
    srv = config.server
    host = args.host or srv.host
    port = args.port if args.port is not None else srv.port
    sockets = [listen(host, port)]
    if srv.admin_port is not None:
        # One server, two listeners: the app tells them apart by the port it was reached on.
        sockets.append(listen(srv.admin_host, srv.admin_port))
    _tune_gc()
    server.run(sockets=sockets)
    return 0


def _tune_gc() -> None:
    """What exists at startup (modules, configuration, pydantic models) lives as long as
    the process: move it out of the collector's sight, so that full collections walk
    only what requests made. Requests allocate a few hundred container objects each;
    a larger first generation collects them in fewer, still short, passes."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.file)
    except ConfigError as exc:
        print(f"{args.file}: invalid configuration:\n{exc}", file=sys.stderr)
        return 2
    print(
        f"{args.file}: ok ({len(config.accounts)} accounts, {len(config.pools)} pools, "
        f"{len(config.groups)} groups, {len(config.tokens)} tokens)"
    )
    return 0


def cmd_keys_new(args: argparse.Namespace) -> int:
    secret = args.secret or os.environ.get("GATEWAY_SECRET", "")
    if args.config and not secret:
        try:
            secret = load_config(args.config).server.secret
        except ConfigError as exc:
            print(f"{args.config}: invalid configuration:\n{exc}", file=sys.stderr)
            return 2
    if len(secret) < 16:
        print(
            "a server secret of at least 16 characters is needed: --config FILE, --secret, "
            "or GATEWAY_SECRET",
            file=sys.stderr,
        )
        return 2
    key = args.key or new_key()
    print(f"# The key, shown once; give it to the caller and keep no copy:\n# {key}")
    print("# Add this entry under `tokens:` in the configuration:")
    print(f"- name: {args.name}")
    print(f"  key_hash: {hash_key(secret, key)}")
    print(f"  user: {args.user or args.name}")
    print(f"  user_group: {args.user_group}")
    print(f"  group: {args.group}")
    return 0


def cmd_emulate(args: argparse.Namespace) -> int:
    from gateway import emulator

    return emulator.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from gateway.demo import main as demo_main

    return demo_main(args)


def cmd_usage_export(args: argparse.Namespace) -> int:
    from gateway.savings import cmd_export

    return cmd_export(args)


def cmd_savings(args: argparse.Namespace) -> int:
    from gateway.savings import cmd_savings as run

    return run(args)


def cmd_simulate(args: argparse.Namespace) -> int:
    from affinity.simulate import main as simulate

    return simulate(args.args)


def cmd_tokens(args: argparse.Namespace) -> int:
    """Runtime token admin over the gateway's admin API."""
    import asyncio

    import aiohttp
    import orjson

    base = args.url.rstrip("/") + "/admin/tokens"
    action = args.tokens_command
    if action == "create":
        body: dict[str, object] = {"name": args.name, "group": args.group}
        for field in ("user", "user_group", "rpm", "tpm", "budget_usd_day", "budget_usd_month"):
            value = getattr(args, field)
            if value is not None:
                body[field] = value
        method, url, payload = "POST", base, orjson.dumps(body)
    elif action == "list":
        method, url, payload = "GET", base, None
    elif action == "rotate":
        method, url, payload = "POST", f"{base}/{args.name}/rotate", None
    else:
        method, url, payload = "DELETE", f"{base}/{args.name}", None

    async def go() -> tuple[int, bytes]:
        headers = {"authorization": f"Bearer {args.admin_key}", "content-type": "application/json"}
        async with (
            aiohttp.ClientSession() as s,
            s.request(method, url, data=payload, headers=headers) as r,
        ):
            return r.status, await r.read()

    status, raw = asyncio.run(go())
    print(orjson.dumps(orjson.loads(raw), option=orjson.OPT_INDENT_2).decode())
    if status >= 400:
        return 1
    if "key" in (doc := orjson.loads(raw)):
        print(
            f"# The key above is shown once; give it to {doc['name']} and keep no copy.",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinity-gateway",
        description="A cache-affinity-aware LLM API gateway.",
    )
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="YAML configuration file")
    serve.add_argument("--host", default=None, help="override server.host")
    serve.add_argument("--port", type=int, default=None, help="override server.port")
    serve.add_argument(
        "--drain-seconds", type=float, default=30.0, help="grace for in-flight streams on SIGTERM"
    )
    serve.add_argument(
        "--shutdown-delay",
        type=float,
        default=1.0,
        help="seconds between SIGTERM (readyz turns 503) and closing the listener",
    )
    serve.set_defaults(func=cmd_serve)

    check = sub.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)

    keys = sub.add_parser("keys", help="manage API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="make a key; print it once with its config entry")
    new.add_argument("--name", required=True)
    new.add_argument("--group", required=True)
    new.add_argument("--user", default="")
    new.add_argument("--user-group", default="default")
    new.add_argument("--config", default=None, help="read the server secret from this config")
    new.add_argument("--secret", default=None, help="the server secret (else GATEWAY_SECRET)")
    new.add_argument("--key", default=None, help=argparse.SUPPRESS)  # fixed demo keys
    new.set_defaults(func=cmd_keys_new)

    from gateway import emulator

    emulate = sub.add_parser("emulate", help="run the provider emulator")
    emulator.add_arguments(emulate)
    emulate.set_defaults(func=cmd_emulate)

    tokens = sub.add_parser("tokens", help="runtime tokens, through a gateway's admin API")
    tokens.add_argument(
        "--url", default="http://127.0.0.1:8080", help="the gateway (or its admin port)"
    )
    tokens.add_argument(
        "--admin-key",
        default=os.environ.get("GATEWAY_ADMIN_KEY"),
        required=not os.environ.get("GATEWAY_ADMIN_KEY"),
    )
    tokens_sub = tokens.add_subparsers(dest="tokens_command", required=True)
    create = tokens_sub.add_parser("create", help="make a token; prints its key once")
    create.add_argument("--name", required=True)
    create.add_argument("--group", required=True)
    create.add_argument("--user")
    create.add_argument("--user-group", dest="user_group")
    create.add_argument("--rpm", type=int)
    create.add_argument("--tpm", type=int)
    create.add_argument("--budget-usd-day", dest="budget_usd_day", type=float)
    create.add_argument("--budget-usd-month", dest="budget_usd_month", type=float)
    tokens_sub.add_parser("list", help="runtime tokens (never their keys)")
    for verb, text in (
        ("rotate", "a new key for a token; the old one stops working"),
        ("revoke", "remove a token"),
    ):
        p = tokens_sub.add_parser(verb, help=text)
        p.add_argument("name")
    tokens.set_defaults(func=cmd_tokens)

    usage = sub.add_parser("usage", help="usage log tools")
    usage_sub = usage.add_subparsers(dest="usage_command", required=True)
    export = usage_sub.add_parser("export", help="write a gateway's usage log as JSONL or CSV")
    export.add_argument("--url", default="http://127.0.0.1:8080", help="the gateway")
    export.add_argument("--key", required=True, help="an API key (an admin key exports all)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", default="-", help="file, or - for standard output")
    export.set_defaults(func=cmd_usage_export)

    savings = sub.add_parser("savings", help="what caching saved, from a usage export")
    savings.add_argument("file", help="a usage export (.jsonl or .csv)")
    savings.add_argument(
        "--what-if-round-robin", action="store_true", help="estimate a pool without affinity"
    )
    savings.add_argument("--accounts", type=int, default=8, help="pool size for the estimate")
    savings.set_defaults(func=cmd_savings)

    simulate = sub.add_parser(
        "simulate",
        help="replay a trace offline through the affinity code (see: simulate --help)",
        add_help=False,
    )
    simulate.add_argument("args", nargs=argparse.REMAINDER)
    simulate.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="emulator + gateway + a workload, then a table")
    demo.add_argument("--requests", type=int, default=0, help="0: the built-in workload")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
