"""``python -m bench [NAME ...]``: run benchmarks (all by default) and print measured ratios."""

import argparse
import sys

from bench import preprocess, train

BENCHES = {"preprocess": preprocess.main, "train": train.main}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("names", nargs="*", choices=[*BENCHES, []], help="benchmarks to run (default: all)")
    p.add_argument("--videos", type=int, default=16, help="synthetic clips to measure on (default 16)")
    p.add_argument("--out", default="bench_out", help="work directory (corpus is reused between runs)")
    args = p.parse_args(argv)
    for name in args.names or list(BENCHES):
        BENCHES[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
