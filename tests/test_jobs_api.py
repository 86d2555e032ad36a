"""`ray job submit` through the Jobs API of a real two-node Ray cluster on this host."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import FeatureStore

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jobs_cluster():
    """Head (with the dashboard that serves the Jobs API) + one worker node; yields the API URL."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    port = free_port()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_port": port})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        cluster.shutdown()


def submit(api: str, *entrypoint: str, timeout: float = 400) -> subprocess.CompletedProcess:
    # Ray 2.60 asks for token authentication on the Jobs API; the local cluster and this client
    # share the token in ~/.ray/auth_token (docs/operations.md: how the token reaches submitters)
    cmd = [str(BIN / "ray"), "job", "submit", "--address", api, "--", *entrypoint]
    for _ in range(30):  # the dashboard agent that takes submissions may still be starting (Ray says: retry)
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if res.returncode == 0 or "No available agent to submit job" not in res.stdout + res.stderr:
            return res
        time.sleep(2)
    return res


def test_preprocessing_job_through_the_jobs_api(jobs_cluster, corpus, tmp_path):
    corpus_dir, _, _ = corpus
    out = tmp_path / "fs"
    res = submit(jobs_cluster, str(BIN / "microemo"), "preprocess", "--manifest", str(corpus_dir / "manifest.jsonl"),
                 "--out", str(out), "--address", "auto", "--workers", "2", "-q", "videos_per_shard=3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    committed = FeatureStore(str(out)).committed()
    assert len(committed) == 6 and {v["status"] for v in committed.values()} == {"ok"}


def test_a_failing_job_reports_failure_through_its_exit_code(jobs_cluster, tmp_path):
    res = submit(jobs_cluster, str(BIN / "microemo"), "preprocess", "--manifest", str(tmp_path / "missing.jsonl"),
                 "--out", str(tmp_path / "fs"), "--address", "auto")
    assert res.returncode != 0
    assert "no such manifest" in res.stdout + res.stderr


def test_stage1_training_job_through_the_jobs_api(jobs_cluster, synth_store, tmp_path):
    # two Ray Train ranks, one per node of the fixture's cluster; DeepSpeed on CPU (gloo)
    run = tmp_path / "s1"
    res = submit(jobs_cluster, "env", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1", str(BIN / "microemo"), "train",
                 "--stage", "1", "--features", str(synth_store), "--out", str(run), "--launcher", "ray",
                 "--address", "auto", "--num-workers", "2", "max_steps=2", "save_every=2", "micro_batch_size=1",
                 "split=null")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "succeeded" in (res.stdout + res.stderr).lower()
    for name in ("export/microemo.safetensors", "export/model_config.json", "config.yaml", "metrics.jsonl",
                 "checkpoints/latest", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["step"] == 2 and summary["world_size"] == 2
