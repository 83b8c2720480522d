"""Fixtures of the deployment tests; helpers live in tests/deploy/support.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.deploy.support import KUSTOMIZATIONS, Manifest, render


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "build_check: runs deploy/build-check.sh (fresh venvs from PyPI; under a minute)"
    )


@pytest.fixture(scope="session")
def rendered() -> Iterator[dict[str, list[Manifest]]]:
    """Every kustomization under deploy/k8s, rendered once."""
    yield {name: render(name) for name in KUSTOMIZATIONS}
