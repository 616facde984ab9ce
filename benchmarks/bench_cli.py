"""Benchmark: start-up time of the ``cpreg`` command line, measured as whole processes.

Each command runs ``--repeats`` times as ``cpreg --home WS ...`` in a fresh process, in a workspace
holding one mask and one release of the built-in tiny model (made once, before timing). Reports
the minimum and median wall time per command and the load average of the machine while it ran.

Example:
    python benchmarks/bench_cli.py --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (label, arguments, target in seconds) of the commands issue 11 names.
COMMANDS = [
    ("cpreg --help", ["--help"], 0.5),
    ("cpreg masks list", ["masks", "list"], 1.0),
    ("cpreg releases list", ["releases", "list"], 1.0),
    ("cpreg log", ["log"], 1.0),
    ("cpreg concepts list", ["concepts", "list"], 1.0),
]


def _cpreg() -> str:
    found = shutil.which("cpreg", path=str(Path(sys.executable).parent)) or shutil.which("cpreg")
    if found is None:
        raise SystemExit("the cpreg console script is not installed (pip install -e .)")
    return found


def _run(cpreg: str, home: Path, args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([cpreg, "--home", str(home), *args], check=True, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    cpreg = _cpreg()
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / ".cpreg"
        for setup in (["init"], ["compute", "nudity", "--model", "tiny", "--steps", "2", "--timesteps", "1"],
                      ["compose", "nudity@1", "--release", "safe-v1"]):
            _run(cpreg, home, setup)
        load_before = os.getloadavg()[0]
        results = []
        for label, command, target in COMMANDS:
            _run(cpreg, home, command)  # warm the file cache
            times = [_run(cpreg, home, command) for _ in range(args.repeats)]
            results.append({"command": label, "min_s": round(min(times), 3), "median_s": round(statistics.median(times), 3),
                            "target_s": target, "met": statistics.median(times) <= target})
        report = {"repeats": args.repeats, "python": sys.version.split()[0], "cpus": os.cpu_count(),
                  "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2), "results": results}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
