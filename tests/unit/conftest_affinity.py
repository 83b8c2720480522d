"""Helpers shared by the affinity tests: trace-style fingerprints, a fake clock, and a
real redis-server per test session."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import xxhash

from affinity.fingerprint import Fingerprint

BLOCK = 512


def chain(*ids: int, session: str | None = None, min_tokens: int = 1024) -> Fingerprint:
    """A fingerprint whose block i + 1 stands for the prefix ids[:i + 1], like trace blocks."""
    hashes = [0]
    for block in ids:
        hashes.append(xxhash.xxh3_64_intdigest(block.to_bytes(8, "little"), hashes[-1]))
    tokens = tuple(i * BLOCK for i in range(len(hashes)))
    pin_from = next((i for i, t in enumerate(tokens) if i and t >= min_tokens), len(tokens))
    root = hashes[min(max(pin_from, 1), len(hashes) - 1)]
    if session is not None:
        root = xxhash.xxh3_64_intdigest(session.encode(), root)
    return Fingerprint(tuple(hashes), tokens, root, tokens[-1], session, hashes[-1], pin_from)


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


_NO_PERSISTENCE = ("--save", "", "--appendonly", "no")


class RedisServer:
    """A throwaway redis-server on a free 127.0.0.1 port, without persistence."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        if not self.port:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", *_NO_PERSISTENCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not come up")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
