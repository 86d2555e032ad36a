"""Shared fixtures. The synthetic corpus is rendered once per session (real espeak-ng,
real ffmpeg) and reused by every test that needs videos."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("ffmpeg", "ffprobe", "espeak-ng")


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tools():
    missing = [t for t in REQUIRED_TOOLS if shutil.which(t) is None]
    if missing:  # `make test` installs them; a bare pytest run must say why it cannot go on
        pytest.fail(f"missing system tools: {', '.join(missing)} (run `make setup`)")


@pytest.fixture(scope="session")
def identities():
    from pipeline.synth.identities import load_identities

    return load_identities()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, tools):
    """A small rendered corpus: (directory, config, summary)."""
    from pipeline.synth.corpus import SynthConfig, generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    cfg = SynthConfig(out=str(out), videos=6, seed=11, workers=2)
    summary = generate_corpus(cfg, progress=False)
    return out, cfg, summary
