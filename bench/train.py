"""Training throughput: samples/s with 1 rank (in-process) and 2 ranks (torchrun, gloo), and the
share of step time spent waiting for data, on the same synthetic feature store in one run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def _store(out: Path, n: int) -> Path:
    import ray

    from bench.preprocess import _corpus
    from pipeline.run import PreprocessConfig, preprocess

    corpus = _corpus(out, n)
    fs = out / f"store{n}"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        preprocess(PreprocessConfig(manifest=str(corpus / "manifest.jsonl"), out=str(fs)), progress=False)
    finally:
        ray.shutdown()
    return fs


def main(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from jobs.train import TrainConfig, launch

    out = Path(args.out)
    store = _store(out, args.videos)
    print(f"== training benchmark: tiny preset, stage 1, {args.videos} clips, micro-batch 2 per rank ==")
    rates = {}
    for ranks, launcher in ((1, "local"), (2, "torchrun")):
        run = out / f"train{ranks}"
        shutil.rmtree(run, ignore_errors=True)
        s = launch(TrainConfig(stage=1, features=str(store), out=str(run), launcher=launcher, num_workers=ranks,
                               max_steps=20, save_every=1000, micro_batch_size=2, split=None))
        rates[ranks] = s["samples_per_s"]
        print(f"{ranks} rank{'s' if ranks > 1 else ' '}  {s['samples_per_s']:6.2f} samples/s, "
              f"{100 * s['data_wait_frac']:4.1f}% of step time waiting for data")
    print(f"ratio  2 ranks / 1 rank: {rates[2] / rates[1]:.2f} (2 cores, gloo; ideal 2.0)")
