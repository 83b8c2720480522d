"""The health-check one-liners (the image's HEALTHCHECK, the sidecar's exec probes, the
compose emulator's check), run against a local HTTP server: exit 0 on a 2xx, non-zero
on an error status or no answer, and never through an HTTP proxy from the environment."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest
import yaml

from tests.deploy.support import DEPLOY, dockerfile_instructions


def image_healthcheck() -> list[str]:
    (check,) = [rest for _, i, rest in dockerfile_instructions() if i == "HEALTHCHECK"]
    command: list[str] = json.loads(check.split(" CMD ", 1)[1])
    return command


def sidecar_probes() -> dict[str, list[str]]:
    docs = yaml.safe_load_all((DEPLOY / "k8s/overlays/sidecar/app.yaml").read_text())
    (app,) = [d for d in docs if d["kind"] == "Deployment"]
    (gateway,) = app["spec"]["template"]["spec"]["initContainers"]
    return {
        f"sidecar {probe}": gateway[probe]["exec"]["command"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }


def emulator_healthcheck() -> list[str]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    test: list[str] = compose["services"]["emulator"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    return test[1:]


COMMANDS = {
    "image HEALTHCHECK": image_healthcheck(),
    **sidecar_probes(),
    "compose emulator healthcheck": emulator_healthcheck(),
}


class Server:
    """Answers `status` to every GET; records the paths asked."""

    def __init__(self) -> None:
        self.status = 200
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                self.send_response(outer.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


URL = re.compile(r"http://127\.0\.0\.1:\d+(/\w+)")


def run(command: list[str], port: int) -> tuple[int, str]:
    """Run a probe command with its port swapped for `port`, behind a dead proxy.
    Returns the exit code and the path the command asks."""
    assert command[:2] == ["python", "-c"]
    (path,) = URL.findall(command[2])
    code = URL.sub(f"http://127.0.0.1:{port}{path}", command[2])
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": ""}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    return result.returncode, path


@pytest.mark.parametrize("name", COMMANDS)
def test_probe_passes_on_200(server: Server, name: str) -> None:
    code, path = run(COMMANDS[name], server.port)
    assert code == 0
    assert server.paths == [path]


@pytest.mark.parametrize("name", COMMANDS)
def test_probe_fails_on_503(server: Server, name: str) -> None:
    server.status = 503
    code, _ = run(COMMANDS[name], server.port)
    assert code != 0
    assert len(server.paths) == 1


@pytest.mark.parametrize("name", COMMANDS)
def test_probe_fails_with_nothing_listening(name: str) -> None:
    code, _ = run(COMMANDS[name], free_port())
    assert code != 0
