"""``python -m bench [NAME ...] [--quick]``: run benchmarks (all by default), write
``RESULTS/<name>.json`` and ``RESULTS/summary.md``, and print the table.

Benchmarks: preprocess, train, infer, gpu (docs/benchmarks.md says what each measures).
``--quick`` runs small sizes (a few clips, a few steps) to check that everything works; its
numbers are not benchmarks. A benchmark that raises is recorded as an ``error`` row and the
others still run; the exit status is then 1. Misses of a goal do not change the exit status.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

NAMES = ("preprocess", "train", "infer", "gpu")


@dataclass
class Context:
    out: Path  # work directory: corpus, stores, runs, logs (reused between runs)
    quick: bool
    model_dir: str | None = None  # infer: a trained weights directory (default: a random-initialised one)


def _bench(name: str):
    import importlib

    return importlib.import_module(f"bench.{name}").main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run: {', '.join(NAMES)} (default: all)")
    p.add_argument("--quick", action="store_true", help="small sizes: checks the benchmarks run (minutes)")
    p.add_argument("--out", default="bench_out", type=Path, help="work directory (default bench_out; reused)")
    p.add_argument("--results", type=Path, default=None,
                   help="where <name>.json and summary.md go (default bench/results, or OUT/results with --quick)")
    p.add_argument("--model-dir", default=None, help="infer: trained weights directory to time (default: built)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)} (choose from {', '.join(NAMES)})")
    return args


def main(argv=None) -> int:
    # measurements run in child processes that set their own thread counts (bench.child)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from bench.report import Result, load_all, save, summary_md, table

    args = parse_args(argv)
    # quick numbers are not results: unless asked, they stay out of the committed bench/results
    results_dir = args.results or (args.out / "results" if args.quick else Path(__file__).parent / "results")
    ctx = Context(out=args.out.resolve(), quick=args.quick, model_dir=args.model_dir)
    ctx.out.mkdir(parents=True, exist_ok=True)
    ran, failed = [], False
    for name in [n for n in NAMES if n in (args.names or NAMES)]:  # fixed order: train reuses preprocess's store
        t0 = time.perf_counter()
        try:
            result = _bench(name)(ctx)
        except Exception as exc:  # one broken benchmark must not hide the others' numbers
            traceback.print_exc()
            result = Result(name, args.quick)
            result.error("benchmark failed", exc)
            failed = True
        result.seconds = time.perf_counter() - t0
        save(result, results_dir)
        ran.append(result)
    (results_dir / "summary.md").write_text(summary_md(load_all(results_dir, list(NAMES))))
    print()
    print(table(ran))
    print(f"\nresults: {results_dir}/<name>.json, {results_dir}/summary.md")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
