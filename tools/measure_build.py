"""Size, start-up time and memory of the single-file executable beside the pip-installed server.

    python tools/measure_build.py [--executable dist/tornado-rt] [--runs 5]

Start-up time: from spawning ``serve --port 0`` until its start-up line is printed (the server
is listening then), median of ``--runs``. RSS: the resident memory once started, summed over the
process tree (the one-file executable is a small launcher process plus the Python process it
unpacks and starts). The pip-installed server is this interpreter's ``tornado-rt`` console script.
Prints a Markdown table. Not a test: the numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

ARGS = ["serve", "--port", "0", "--jwt-secret", "measure-secret-long-enough-for-hs256", "--api-key",
        "measure-api-key", "--log-level", "warning"]


def _children(pid: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
                if int(fields[1]) == pid:
                    found.append(int(entry))
            except OSError:
                continue
    return found


def _rss_kib(pid: int) -> int:
    total = 0
    for p in [pid, *_children(pid)]:
        with open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def start_once(program: List[str], env: Dict[str, str]) -> Tuple[float, int]:
    started = time.perf_counter()
    proc = subprocess.Popen(program + ARGS, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=env, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("tornado-rt listening:"):
                break
        else:
            raise RuntimeError(f"{program[0]} exited with {proc.wait()} before listening")
        elapsed = time.perf_counter() - started
        return elapsed, _rss_kib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def measure(program: List[str], runs: int, env: Dict[str, str]) -> Tuple[float, int]:
    results = [start_once(program, env) for _ in range(runs)]
    return statistics.median(t for t, _ in results), int(statistics.median(r for _, r in results))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executable", default="dist/tornado-rt")
    parser.add_argument("--zipapp", default="dist/tornado-rt.pyz", help="measured too when it exists")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    script = shutil.which("tornado-rt", path=os.path.dirname(sys.executable)) or shutil.which("tornado-rt")
    if script is None:
        raise SystemExit("the tornado-rt console script is not installed in this environment")
    with tempfile.TemporaryDirectory() as home:
        bare = {"PATH": os.path.join(home, "empty"), "HOME": home, "TMPDIR": home}
        rows = [("single-file executable", args.executable, os.path.getsize(args.executable),
                 *measure([os.path.abspath(args.executable)], args.runs, bare)),
                ("pip-installed (console script)", script, None,
                 *measure([script], args.runs, {**os.environ})),
                ]
        if os.path.exists(args.zipapp):  # run by the base interpreter, unpacked once into SHIV_ROOT
            base = getattr(sys, "_base_executable", sys.executable)
            shiv_env = {**bare, "SHIV_ROOT": os.path.join(home, "shiv")}
            start_once([base, args.zipapp], shiv_env)  # the first run unpacks
            rows.append(("shiv zipapp (unpacked)", args.zipapp, os.path.getsize(args.zipapp),
                         *measure([base, args.zipapp], args.runs, shiv_env)))
    print(f"| build | size | start-up (median of {args.runs}) | RSS after start |")
    print("|---|---|---|---|")
    for label, _path, size, seconds, rss in rows:
        size_text = f"{size / 1e6:.1f} MB" if size is not None else "(installed package)"
        print(f"| {label} | {size_text} | {seconds * 1000:.0f} ms | {rss / 1024:.1f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
