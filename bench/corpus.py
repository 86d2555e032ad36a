"""The synthetic corpus and feature stores the benchmarks measure on, built once under the work
directory and reused by later runs (clips are a pure function of seed and index, so the first
``n`` clips of a bigger corpus are the ``n``-clip corpus)."""

from __future__ import annotations

import json
from pathlib import Path

SEED = 123


def manifest(out: Path, n: int) -> Path:
    """A manifest of the first ``n`` synthetic clips (rendering the ones not there yet)."""
    from pipeline.synth.corpus import SynthConfig, generate_corpus

    d = out / "corpus"
    full = d / "manifest.jsonl"
    rows = full.read_text().splitlines() if full.is_file() else []
    if len(rows) < n:
        generate_corpus(SynthConfig(out=str(d), videos=n, seed=SEED), progress=False)
        rows = full.read_text().splitlines()
    path = d / f"first{n}.jsonl"  # beside manifest.jsonl: clip paths are relative to it
    path.write_text("\n".join(rows[:n]) + "\n")
    return path


def videos(out: Path, n: int) -> list[Path]:
    """Paths of the first ``n`` clips."""
    m = manifest(out, n)
    return [m.parent / json.loads(line)["uri"] for line in m.read_text().splitlines()]


def store_path(out: Path, n: int) -> Path:
    return out / f"store{n}"


def store(out: Path, n: int) -> Path:
    """The feature store of the first ``n`` clips (preprocessed on a local Ray unless complete)."""
    from pipeline.store import FeatureStore

    path = store_path(out, n)
    if path.is_dir() and len(FeatureStore(str(path)).committed()) == n:
        return path
    import ray

    from pipeline.run import PreprocessConfig, preprocess

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        preprocess(PreprocessConfig(manifest=str(manifest(out, n)), out=str(path), overwrite=True), progress=False)
    finally:
        ray.shutdown()
    return path
