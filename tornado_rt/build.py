"""Build ``tornado-rt`` for an edge box: ``python -m tornado_rt.build``.

Needs the ``build`` extra (``pip install 'tornado-rt[build,redis]'``) and is run from an
environment where tornado-rt is installed (a checkout with ``pip install -e``, or the wheel).

``--executable`` (default on): ``dist/tornado-rt``, one self-contained file made by PyInstaller
``--onefile`` for this machine's platform (OS, CPU architecture and a glibc no newer than this
one's). It holds Python itself, tornado-rt, the built-in plugins (core, database, premium), ujson,
prometheus-client, PyJWT with cryptography and, when installed here, the Redis broker (redis,
hiredis). Copy it to the box and run ``./tornado-rt serve ...``; nothing else is needed. At each
start it unpacks itself into a temporary directory (``$TMPDIR``; the systemd unit's
``PrivateTmp=`` gives it one of its own), which costs some start-up time.

``--zipapp``: ``dist/tornado-rt.pyz``, a much smaller shiv zipapp for machines that already have
Python 3.11+ of the same version and platform (ujson and hiredis are compiled extensions). It
unpacks its dependencies once into ``~/.shiv`` (``SHIV_ROOT`` to change that). shiv installs
tornado-rt and its dependencies with pip, so it needs the package index (or a wheelhouse given to
pip through ``PIP_FIND_LINKS``).

Built-in plugins: the server imports ``tornado_rt_plugins`` directly (not through entry points,
which a frozen program cannot see), and the distribution metadata is copied into the executable
so that ``importlib.metadata`` (and with it the ``tornado_rt.plugins`` entry-point group) still
works.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

NAME = "tornado-rt"
LAUNCHER = "import sys\nfrom tornado_rt.cli import main\nsys.exit(main())\n"
#: Modules imported only by name or lazily that the executable must hold.
HIDDEN_IMPORTS = ("tornado_rt.redis_broker", "tornado_rt_plugins.core", "tornado_rt_plugins.database",
                  "tornado_rt_plugins.premium", "ujson", "prometheus_client", "jwt.algorithms")
OPTIONAL_MODULES = ("redis", "redis.asyncio", "hiredis")
#: Not needed by a server; PyInstaller would otherwise follow optional imports into them.
EXCLUDES = ("tkinter", "unittest", "pydoc", "test", "pytest", "IPython", "numpy", "setuptools", "pkg_resources",
            "hypothesis", "websockets", "mypy")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def pyinstaller_args(dist: str, work: str, launcher: str) -> List[str]:
    """The PyInstaller command line (without the program) for the one-file executable."""
    args = ["--onefile", "--noconfirm", "--clean", "--log-level", "WARN", "--name", NAME,
            "--distpath", dist, "--workpath", work, "--specpath", work,
            "--collect-submodules", "tornado_rt", "--collect-submodules", "tornado_rt_plugins"]
    for module in HIDDEN_IMPORTS + tuple(m for m in OPTIONAL_MODULES if _installed(m)):
        args += ["--hidden-import", module]
    for module in EXCLUDES:
        args += ["--exclude-module", module]
    try:
        from importlib import metadata
        metadata.distribution(NAME)
        args += ["--copy-metadata", NAME]
    except Exception:  # not installed as a distribution: the built-ins still load by import
        pass
    return args + [launcher]


def build_executable(dist: str, work: Optional[str] = None) -> str:
    """Build ``dist/tornado-rt`` with PyInstaller; returns its path."""
    if not _installed("PyInstaller"):
        raise SystemExit("tornado-rt build: PyInstaller is missing: pip install 'tornado-rt[build]'")
    if not _installed("tornado_rt_plugins"):
        raise SystemExit("tornado-rt build: the built-in plugins (tornado_rt_plugins) are not importable; "
                         "install tornado-rt first (pip install -e . or the wheel)")
    owned = work is None
    work = work or tempfile.mkdtemp(prefix="tornado-rt-build-")
    try:
        launcher = os.path.join(work, "tornado_rt_main.py")
        with open(launcher, "w", encoding="utf-8") as fh:
            fh.write(LAUNCHER)
        # An editable install maps tornado_rt_plugins to plugins/ through an import hook that
        # PyInstaller's analysis does not run: give it both packages under their import names.
        staging = os.path.join(work, "src")
        for package in ("tornado_rt", "tornado_rt_plugins"):
            spec = importlib.util.find_spec(package)
            assert spec is not None and spec.submodule_search_locations
            shutil.copytree(list(spec.submodule_search_locations)[0], os.path.join(staging, package),
                            ignore=shutil.ignore_patterns("__pycache__"))
        args = pyinstaller_args(os.path.abspath(dist), work, launcher)
        cmd = [sys.executable, "-m", "PyInstaller", "--paths", staging, *args]
        subprocess.run(cmd, check=True)
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return os.path.join(dist, NAME)


def build_zipapp(dist: str, source: str, extras: str = "redis") -> str:
    """Build ``dist/tornado-rt.pyz`` with shiv from the project at ``source``; returns its path."""
    if not _installed("shiv"):
        raise SystemExit("tornado-rt build: shiv is missing: pip install 'tornado-rt[build]'")
    os.makedirs(dist, exist_ok=True)
    target = os.path.join(dist, f"{NAME}.pyz")
    requirement = f"{os.path.abspath(source)}[{extras}]" if extras else os.path.abspath(source)
    cmd = [sys.executable, "-m", "shiv", "--console-script", NAME, "--output-file", target,
           "--python", "/usr/bin/env python3", "--reproducible", "--compressed", requirement]
    subprocess.run(cmd, check=True)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tornado_rt.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--executable", action="store_true", help="build dist/tornado-rt with PyInstaller")
    parser.add_argument("--zipapp", action="store_true", help="build dist/tornado-rt.pyz with shiv")
    parser.add_argument("--dist", default="dist", help="output directory (default: dist)")
    parser.add_argument("--source", default=".", help="project directory for the zipapp (default: .)")
    parser.add_argument("--no-redis", action="store_true", help="zipapp without the redis extra")
    args = parser.parse_args(argv)
    if not args.executable and not args.zipapp:
        args.executable = True
    if args.executable:
        print(f"built {build_executable(args.dist)}")
    if args.zipapp:
        print(f"built {build_zipapp(args.dist, args.source, '' if args.no_redis else 'redis')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
