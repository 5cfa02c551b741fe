"""Run every benchmark in turn: ``python bench/run_all.py [--quick] [--only NAME ...]``.

Each benchmark is its own script (``bench/bench_<name>.py``) writing JSON and a markdown table
under ``bench/results/``; this runs them one after another in subprocesses (so one's memory or
threads do not affect the next) and prints where each table is. Benchmarks time themselves
against a baseline in the same run, so their ratios stay meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("hardware", "quantize", "prune", "darts", "haq", "search", "checkpoint")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smoke runs (each benchmark's --quick)")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, help="run only these benchmarks")
    args = parser.parse_args(argv)
    failed = []
    for name in args.only or BENCHMARKS:
        command = [sys.executable, str(HERE / f"bench_{name}.py")]
        if args.quick and name != "hardware":
            command.append("--quick")
        print(f"== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        code = subprocess.call(command, cwd=HERE.parent)
        print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
