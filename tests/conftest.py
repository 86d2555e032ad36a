"""Shared fixtures. The synthetic corpus is rendered once per session (real espeak-ng,
real ffmpeg) and reused by every test that needs videos."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRED_TOOLS = ("ffmpeg", "ffprobe", "espeak-ng")


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Tests never touch the network: no model hubs, no Ray usage reports.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"


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


@pytest.fixture(scope="session")
def bad_inputs(tmp_path_factory, corpus):
    """Broken and unusual inputs made from a good clip: name -> path (what each is, in its name)."""
    import subprocess

    out, _, _ = corpus
    good = out / "videos" / "syn000000.mp4"
    d = tmp_path_factory.mktemp("bad")
    paths = {}
    paths["zero_byte"] = d / "zero_byte.mp4"
    paths["zero_byte"].write_bytes(b"")
    paths["text_as_mp4"] = d / "text_as_mp4.mp4"
    paths["text_as_mp4"].write_text("this is not a video\n")
    data = good.read_bytes()
    paths["truncated"] = d / "truncated.mp4"
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["playlist_as_mp4"] = d / "playlist_as_mp4.mp4"  # would make ffmpeg fetch a URL / read files
    paths["playlist_as_mp4"].write_text("#EXTM3U\n#EXTINF:1,\nhttp://127.0.0.1:9/x.ts\n#EXTINF:1,\n/etc/hostname\n")
    paths["no_audio"] = d / "no_audio.mp4"
    paths["audio_only"] = d / "audio_only.m4a"
    paths["no_face"] = d / "no_face.mp4"
    paths["missing"] = d / "missing.mp4"
    run = lambda *a: subprocess.run(["ffmpeg", "-v", "error", "-y", *a], check=True)  # noqa: E731
    run("-i", str(good), "-an", "-c:v", "copy", str(paths["no_audio"]))
    run("-i", str(good), "-vn", "-c:a", "copy", str(paths["audio_only"]))
    run("-f", "lavfi", "-i", "testsrc2=size=320x240:rate=25:duration=3", "-f", "lavfi",
        "-i", "sine=frequency=300:duration=3", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac",
        "-shortest", str(paths["no_face"]))
    return paths


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1: yields (boto3 client, fsspec storage_options)."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing",
                          aws_secret_access_key="testing", region_name="us-east-1")
    opts = {"key": "testing", "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"}}
    yield client, opts
    server.stop()


@pytest.fixture(scope="session")
def synth_store(corpus, tmp_path_factory):
    """The session corpus preprocessed into a local feature store (embedded encoders, local Ray)."""
    import ray

    from pipeline.run import PreprocessConfig, preprocess

    out = tmp_path_factory.mktemp("store") / "fs"
    was_running = ray.is_initialized()
    if not was_running:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        preprocess(PreprocessConfig(manifest=str(corpus[0] / "manifest.jsonl"), out=str(out)), progress=False)
    finally:
        if not was_running:
            ray.shutdown()
    return out


@pytest.fixture(scope="session")
def tiny_model(synth_store, tmp_path_factory):
    """A tiny stage-2 run trained for 2 steps in this process on the session store (its RUN dir)."""
    import os

    from jobs.train import TrainConfig, launch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    run = tmp_path_factory.mktemp("tiny_model") / "run"
    launch(TrainConfig(stage=2, features=str(synth_store), out=str(run), launcher="local", num_workers=1,
                       max_steps=2, save_every=2, micro_batch_size=2, split=None,
                       model={"llm": {"max_new_tokens": 24}}))
    return run
