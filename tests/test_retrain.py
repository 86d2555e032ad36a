"""Scheduled retraining (``microemo retrain``) with real training, scoring and registries: new shards
train and promote, no new data trains nothing, a worse candidate is rejected, concurrent runs, a crash
between training and promotion, and a registry on S3 (moto)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from jobs.config import from_dict
from jobs.registry import LockHeld, Registry, stale_reason
from jobs.retrain import CRASH_ENV, RetrainConfig, retrain
from pipeline.store import TABLES, FeatureStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


# ---------------------------------------------------------------------------- helpers

def splits_of(store) -> dict[str, str]:
    labels = FeatureStore(str(store)).read_table("labels", columns=["video_id", "split"]).to_pylist()
    return {r["video_id"]: r["split"] for r in labels}


def add_shard(src, dst, name: str, ids: list[str]) -> None:
    """Commit the rows of ``ids`` from store ``src`` as shard ``name`` of store ``dst`` (a new partition)."""
    source, target = FeatureStore(str(src)), FeatureStore(str(dst))
    wanted = pa.array(sorted(ids), pa.string())
    tables = {}
    for table in TABLES:
        t = source.read_table(table)
        tables[table] = t.filter(pc.is_in(t["video_id"], value_set=wanted))
    v = tables["videos"]
    tables["videos"] = v.set_column(v.schema.get_field_index("shard"), "shard", pa.array([name] * v.num_rows))
    target.write_shard(name, tables)


def config(store, registry, **over) -> RetrainConfig:
    """Tiny, fast settings: two local steps per stage, heldout_loss unless the test says otherwise."""
    data = {"features": str(store), "registry": str(registry), "metric": "heldout_loss",
            "train": {"launcher": "local", "max_steps": 2, "save_every": 2, "micro_batch_size": 1,
                      "optim": {"warmup_steps": 1}},
            "heldout": {"split": "test"}}
    for key, value in over.items():
        node = data
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return from_dict(RetrainConfig, data)


def write_yaml(path: Path, cfg: RetrainConfig) -> Path:
    from jobs.config import to_dict

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


def decisions(reg: Registry) -> list[dict]:
    return [r for r in reg.history() if r["decision"] in ("promoted", "rejected", "superseded")]


def assert_consistent(reg: Registry) -> None:
    """The pointer names a complete model, every attempt has at most one decision record, no lock is left."""
    cur = reg.current()
    assert cur is not None and reg.model_complete(cur["model_id"])
    card = reg.card(cur["model_id"])
    assert card["pointer"]["model_id"] == cur["model_id"]
    ids = [r["id"] for r in reg.history()]
    assert len(ids) == len(set(ids)), ids
    promoted = [r for r in decisions(reg) if r["decision"] == "promoted"]
    assert promoted[-1]["model_id"] == cur["model_id"]
    for r in promoted:
        assert reg.model_complete(r["model_id"])
    assert reg.read_bytes("lock") is None


@pytest.fixture(scope="module")
def parts(synth_store):
    """The session store's videos split into partitions: base (one training video + the held-out test
    videos), one more training video, the remaining training videos, and the other splits' videos."""
    splits = splits_of(synth_store)
    train = sorted(v for v, s in splits.items() if s == "train")
    assert len(train) >= 3 and "test" in splits.values()
    base = [train[0]] + sorted(v for v, s in splits.items() if s == "test")
    others = sorted(v for v, s in splits.items() if s not in ("train", "test"))
    return {"s0": base, "s1": [train[1]], "s2": train[2:], "others": others}


@pytest.fixture(scope="module")
def promoted(synth_store, parts, tmp_path_factory):
    """A registry whose first run (empty registry: stage 1 + 2 from scratch) promoted a model trained on
    shards s0 and s1, scored with the default EMER metric."""
    root = tmp_path_factory.mktemp("retrain_first")
    store = root / "fs"
    for name in ("s0", "s1"):
        add_shard(synth_store, store, name, parts[name])
    cfg = config(store, root / "reg", metric="emer", score_opts={"embedder": False},
                 train__model={"llm": {"max_new_tokens": 24}})  # short answers: a quicker EMER scoring
    result = retrain(cfg)
    return store, root / "reg", result


@pytest.fixture
def copy_of(promoted, tmp_path):
    """A private copy of the promoted registry and its store."""
    store, reg, _ = promoted
    shutil.copytree(store, tmp_path / "fs")
    shutil.copytree(reg, tmp_path / "reg")
    return tmp_path / "fs", tmp_path / "reg"


def run_cli(cfg_file: Path, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **(env or {}))
    out = open(log, "w") if log else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "retrain", "--config", str(cfg_file)], cwd=ROOT,
                            env=env, stdout=out, stderr=subprocess.STDOUT, text=True)


# ---------------------------------------------------------------------------- tests

def test_first_run_on_an_empty_registry_trains_from_scratch_and_promotes(promoted):
    store, root, result = promoted
    reg = Registry(str(root))
    assert result["outcome"] == "promoted" and result["mode"] == "scratch"
    d = result["decision"]
    assert set(d["train"]) == {"stage1", "stage2"} and d["current_score"] is None
    assert d["metric"] == "emer" and isinstance(d["candidate_score"], float)
    cur = reg.current()
    assert cur["model_id"] == d["model_id"] and sorted(cur["trained_shards"]) == ["s0", "s1"]
    assert cur["metric"] == "emer" and cur["score"] == d["candidate_score"]
    model = Path(cur["path"])
    for name in ("microemo.safetensors", "model_config.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "card.json"):
        assert (model / name).is_file(), name
    card = json.loads((model / "card.json").read_text())
    assert card["parent"] is None and card["data"]["new_shards"] == ["s0", "s1"]
    assert card["metrics"]["metric"] == "emer" and card["config"]["registry"] == str(root)
    assert [r["decision"] for r in reg.history()] == ["promoted"]
    assert_consistent(reg)
    work = root / "attempts" / d["attempt"]
    assert not (work / "stage2" / "checkpoints").exists()  # dropped after the decision (keep_checkpoints)
    assert (work / "decision.json").is_file() and (work / "eval.json").is_file()


def test_no_new_data_trains_nothing(copy_of, synth_store, parts, tmp_path, capsys):
    from jobs.cli import main

    store, root = copy_of
    reg = Registry(str(root))
    before = reg.current()
    attempts = sorted(p.name for p in (root / "attempts").iterdir())
    cfg_file = write_yaml(tmp_path / "retrain.yaml", config(store, root))
    assert main(["retrain", "--config", str(cfg_file)]) == 0
    assert "no new data since " + before["model_id"] in capsys.readouterr().out
    assert retrain(config(store, root))["outcome"] == "no_new_data"
    assert sorted(p.name for p in (root / "attempts").iterdir()) == attempts
    assert reg.current() == before
    checks = [r for r in reg.history() if r["decision"] == "no_new_data"]
    assert len(checks) == 1 and checks[0]["checks"] == 2  # repeated checks update one entry
    # a new shard without training videos is not training data either
    if parts["others"]:
        add_shard(synth_store, store, "s3", parts["others"])
        assert retrain(config(store, root))["outcome"] == "no_new_data"
        assert reg.current() == before


def test_new_shards_fine_tune_the_promoted_model_and_promote(copy_of, synth_store, parts):
    store, root = copy_of
    reg = Registry(str(root))
    parent = reg.current()
    add_shard(synth_store, store, "s2", parts["s2"])
    # margin: two steps of fine-tuning move the held-out loss by noise either way; this test is about
    # the promotion path (the rejection path has its own test)
    test_ids = [v for v, s in splits_of(store).items() if s == "test"]  # an explicit list, same videos
    result = retrain(config(store, root, margin=1.0, heldout={"video_ids": test_ids}, keep_checkpoints=True))
    assert result["outcome"] == "promoted" and result["mode"] == "finetune"
    assert result["decision"]["heldout"]["video_ids"] == sorted(test_ids)
    assert result["new_shards"] == ["s2"]
    d = result["decision"]
    assert set(d["train"]) == {"stage2"} and d["parent"] == parent["model_id"]
    # the pointer's score was EMER: re-scored with this config's metric on the same held-out set
    assert d["current_score_source"] == "re-evaluated" and d["metric"] == "heldout_loss"
    cur = reg.current()
    assert cur["model_id"] == d["model_id"] != parent["model_id"]
    assert sorted(cur["trained_shards"]) == ["s0", "s1", "s2"] and cur["parent"] == parent["model_id"]
    card = reg.card(cur["model_id"])
    assert card["parent"] == parent["model_id"] and card["data"]["new_shards"] == ["s2"]
    assert set(card["data"]["train_videos"]) == set(parts["s2"]) | {parts["s1"][0]} | \
        {v for v in parts["s0"] if splits_of(store)[v] == "train"}
    # stage 2 started from the promoted model's weights (jobs.train's INIT/export layout)
    init = root / "attempts" / d["attempt"] / "init" / "export" / "microemo.safetensors"
    assert init.read_bytes() == (root / "models" / parent["model_id"] / "microemo.safetensors").read_bytes()
    assert (root / "attempts" / d["attempt"] / "stage2" / "checkpoints" / "latest").is_file()  # kept
    assert [r["decision"] for r in decisions(reg)] == ["promoted", "promoted"]
    assert_consistent(reg)


def test_a_worse_candidate_is_not_promoted(copy_of, synth_store, parts):
    store, root = copy_of
    reg = Registry(str(root))
    parent = reg.current()
    add_shard(synth_store, store, "s2", parts["s2"])
    # a misconfigured fine-tune: lr=1 wrecks the model (held-out loss goes from ~5.6 to hundreds of nats
    # per token, still finite), so with margin 0 it must not replace the promoted one
    result = retrain(config(store, root, train__optim={"lr": 1.0, "warmup_steps": 1}))
    assert result["outcome"] == "rejected"
    d = result["decision"]
    assert d["candidate_score"] < d["current_score"] - 1.0
    cur = reg.current()
    assert cur["model_id"] == parent["model_id"] and cur["trained_shards"] == parent["trained_shards"]
    assert cur["metric"] == "heldout_loss" and cur["score"] == d["current_score"]  # re-scored, same model
    assert not (root / "models" / d["model_id"]).exists()
    rec = decisions(reg)[-1]
    assert rec["decision"] == "rejected" and rec["candidate_score"] == d["candidate_score"]
    assert rec["current_score"] == d["current_score"]
    # the same data and settings are not retried, and the history is not repeated
    again = retrain(config(store, root, train__optim={"lr": 1.0, "warmup_steps": 1}))
    assert again["outcome"] == "already_decided" and again["decision"]["decision"] == "rejected"
    assert len(decisions(reg)) == 2
    assert_consistent(reg)


def test_two_concurrent_runs_train_once(copy_of, synth_store, parts, tmp_path):
    store, root = copy_of
    add_shard(synth_store, store, "s2", parts["s2"])
    cfg_file = write_yaml(tmp_path / "retrain.yaml", config(store, root, margin=1e6))
    procs = [run_cli(cfg_file, log=tmp_path / f"run{i}.log") for i in range(2)]
    for p in procs:
        p.wait(timeout=400)
    logs = [(tmp_path / f"run{i}.log").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
    trained = [x for x in logs if "promoted m" in x]
    locked = [x for x in logs if "another run holds the registry lock" in x]
    assert len(trained) == 1 and len(locked) == 1, "\n=====\n".join(x[-3000:] for x in logs)
    assert "stage 2:" not in locked[0]  # the loser trained nothing
    reg = Registry(str(root))
    assert [r["decision"] for r in decisions(reg)] == ["promoted", "promoted"]
    assert_consistent(reg)


@pytest.mark.parametrize("point", ["after_train", "after_pointer"])
def test_a_crash_between_training_and_promotion_then_a_rerun(copy_of, synth_store, parts, tmp_path, point):
    store, root = copy_of
    reg = Registry(str(root))
    parent = reg.current()
    add_shard(synth_store, store, "s2", parts["s2"])
    cfg = config(store, root, margin=1e6)
    proc = run_cli(write_yaml(tmp_path / "retrain.yaml", cfg), env={CRASH_ENV: point}, log=tmp_path / "crash.log")
    proc.wait(timeout=400)
    log = (tmp_path / "crash.log").read_text()
    assert proc.returncode == -signal.SIGKILL, log[-3000:]
    lock = json.loads((root / "lock").read_text())  # a real crash leaves its lock behind
    assert lock["pid"] == proc.pid and stale_reason(lock) is not None
    if point == "after_train":
        assert reg.current() == parent
    else:  # the pointer moved; the history record was never written
        assert reg.current()["model_id"] != parent["model_id"]
        assert len(decisions(reg)) == 1

    result = retrain(cfg)
    broken = [r for r in reg.history() if r["decision"] == "lock_broken"]
    assert len(broken) == 1 and broken[0]["previous_owner"]["pid"] == proc.pid
    if point == "after_train":
        assert result["outcome"] == "promoted"
        assert result["decision"]["train"]["stage2"]["reused"] is True  # not trained twice
    else:
        assert result["outcome"] == "no_new_data"  # the rerun finished the promotion first
    assert retrain(cfg)["outcome"] == "no_new_data"
    promotions = [r for r in decisions(reg) if r["decision"] == "promoted"]
    assert len(promotions) == 2 and promotions[-1]["parent"] == parent["model_id"]
    assert sorted(reg.current()["trained_shards"]) == ["s0", "s1", "s2"]
    assert_consistent(reg)


def test_registry_on_s3(s3, synth_store, parts, tmp_path):
    client, opts = s3
    client.create_bucket(Bucket="retrain-registry")
    url = "s3://retrain-registry/microemo"
    store = tmp_path / "fs"
    for name in ("s0", "s1"):
        add_shard(synth_store, store, name, parts[name])
    cfg = config(store, url, registry_storage_options=opts, work_dir=str(tmp_path / "work"), margin=1e6)
    reg = Registry(url, opts)

    # the lock is a conditional PUT: a second holder is refused, retrain backs off with exit 0
    holder = reg.lock(60, note="test holder")
    holder.acquire()
    with pytest.raises(LockHeld):
        Registry(url, opts).lock(60).acquire()
    assert retrain(cfg)["outcome"] == "locked"
    holder.release()
    assert reg.read_bytes("lock") is None

    first = retrain(cfg)
    assert first["outcome"] == "promoted" and first["mode"] == "scratch"
    keys = {o["Key"] for o in client.list_objects_v2(Bucket="retrain-registry")["Contents"]}
    model = first["decision"]["model_id"]
    assert {"microemo/current.json", "microemo/history.jsonl", f"microemo/models/{model}/card.json",
            f"microemo/models/{model}/microemo.safetensors",
            f"microemo/models/{model}/adapter/adapter_model.safetensors"} <= keys
    assert "microemo/lock" not in keys
    current = json.loads(client.get_object(Bucket="retrain-registry", Key="microemo/current.json")["Body"].read())
    assert current["model_id"] == model and current["path"] == f"{url}/models/{model}"

    # a lock left by a run on another machine that stopped renewing it is taken over (If-Match)
    stale = {"token": "dead", "host": "node-that-died", "pid": 1, "started_ts": time.time() - 7200,
             "renewed_ts": time.time() - 3600, "ttl_s": 600}
    client.put_object(Bucket="retrain-registry", Key="microemo/lock", Body=json.dumps(stale).encode())
    assert retrain(cfg)["outcome"] == "no_new_data"
    assert [r["previous_owner"]["host"] for r in reg.history() if r["decision"] == "lock_broken"] == \
        ["node-that-died"]

    # new data: the promoted model is fetched from S3 into work_dir and fine-tuned
    add_shard(synth_store, store, "s2", parts["s2"])
    second = retrain(cfg)
    assert second["outcome"] == "promoted" and second["mode"] == "finetune"
    assert reg.current()["parent"] == model
    assert_consistent(reg)


# ---------------------------------------------------------------------------- no training needed

def test_local_lock_is_exclusive_and_stale_locks_are_broken(tmp_path):
    reg = Registry(str(tmp_path / "reg"))
    first = reg.lock(60)
    first.acquire()
    with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
        reg.lock(60).acquire()
    first.release()
    assert not (tmp_path / "reg" / "lock").exists()

    # the owner is a dead process on this host: broken at once
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"token": "t1", "host": socket.gethostname(), "pid": dead.pid, "started_ts": time.time(),
              "renewed_ts": time.time(), "ttl_s": 3600}
    (tmp_path / "reg" / "lock").write_text(json.dumps(record))
    lock = reg.lock(60)
    broken = lock.acquire()
    assert broken[0]["previous_owner"]["pid"] == dead.pid and "gone" in broken[0]["reason"]
    lock.release()

    # another host's lock: live until its TTL passes without renewal
    record.update(host="elsewhere", pid=1)
    (tmp_path / "reg" / "lock").write_text(json.dumps(record))
    with pytest.raises(LockHeld):
        reg.lock(60).acquire()
    record.update(renewed_ts=time.time() - 4000)
    (tmp_path / "reg" / "lock").write_text(json.dumps(record))
    lock = reg.lock(60)
    assert "not renewed" in lock.acquire()[0]["reason"]

    # the holder renews its lock; a lock taken from it is noticed before promoting
    before = json.loads((tmp_path / "reg" / "lock").read_text())["renewed_ts"]
    time.sleep(0.01)
    lock.renew()
    assert json.loads((tmp_path / "reg" / "lock").read_text())["renewed_ts"] > before
    (tmp_path / "reg" / "lock").write_text(json.dumps(record | {"token": "thief"}))
    from jobs.registry import LockLost

    with pytest.raises(LockLost):
        lock.check()
    lock.release()  # leaves the other run's lock alone
    assert json.loads((tmp_path / "reg" / "lock").read_text())["token"] == "thief"


@pytest.mark.parametrize("override, field", [
    ("train.out=/tmp/x", "train.out"),
    ("train.max_stepz=3", "train.max_stepz"),
    ("metric=bleu", "metric"),
    ("heldout.split=train", "heldout.split"),
    ("registry=s3://bucket/reg", "work_dir"),
    ("train.split=null", "train.split"),
])
def test_a_bad_config_exits_2_naming_the_field(tmp_path, capsys, override, field):
    from jobs.cli import main

    cfg_file = tmp_path / "retrain.yaml"
    cfg_file.write_text(yaml.safe_dump({"features": str(tmp_path / "fs"), "registry": str(tmp_path / "reg")}))
    assert main(["retrain", "--config", str(cfg_file), override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert field in err[-1] and err[-1].startswith("microemo retrain: error:")
    assert not (tmp_path / "reg").exists()  # nothing was touched


def test_a_held_out_list_naming_a_training_video_exits_2_before_training(copy_of, synth_store, parts, tmp_path,
                                                                          capsys):
    from jobs.cli import main

    store, root = copy_of
    add_shard(synth_store, store, "s2", parts["s2"])
    attempts = sorted(p.name for p in (root / "attempts").iterdir())
    cfg_file = write_yaml(tmp_path / "retrain.yaml", config(store, root, heldout={"video_ids": parts["s2"][:1]}))
    assert main(["retrain", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "heldout.video_ids" in err and parts["s2"][0] in err and "training split" in err
    assert sorted(p.name for p in (root / "attempts").iterdir()) == attempts  # nothing trained or written
    assert not (root / "lock").exists()


def test_the_kuberay_configmap_is_a_valid_retrain_config(tmp_path):
    from jobs.config import load_config

    doc = yaml.safe_load((ROOT / "cluster" / "kuberay" / "retrain-config.yaml").read_text())
    (tmp_path / "retrain.yaml").write_text(doc["data"]["retrain.yaml"])
    cfg = load_config(RetrainConfig, tmp_path / "retrain.yaml")
    assert cfg.registry.startswith("s3://") and cfg.work_dir and cfg.metric == "emer"
    assert cfg.train_config(2, "x").launcher == "ray"
