"""Real external components the tests drive (a browser, proxies, Node, systemd): find them, or
skip locally and FAIL in CI (``CI`` set), where ``.ci/run`` installs every one of them."""
from __future__ import annotations

import shutil

import pytest

from redis_fixtures import in_ci


def need(binary: str, package: str) -> str:
    """The path of ``binary``; skip without it locally, fail in CI (a missing install step)."""
    path = shutil.which(binary)
    if path is None:
        if in_ci():
            pytest.fail(f"{binary} is not installed, and CI is set: .ci/run must install {package}")
        pytest.skip(f"{binary} is not installed (install {package}; the test runs in CI)")
    return path
