"""Predictions from a trained model: load it, answer samples, and batch prediction over a store.

A model is named by a training run directory (``RUN``, whose ``export/`` holds the weights), the
export directory itself, or a registry model directory — anything with ``model_config.json``
beside ``microemo.safetensors`` (``model.weights`` layout).

Batch prediction (``predict_store``) writes one Parquet table next to the features::

    DEST/predictions/<model_id>-g<G>[-n<N>]/part-<uuid>.parquet   one row per video (PREDICTION_SCHEMA)
    DEST/predictions/<...>/_staging/                      parts being written (never read)

``model_id`` is a hash of the weight files (plus the decoding version and token budget in the
folder name), so two models never mix and a retrained model
starts a fresh table. Each part is written under ``_staging`` and then moved into place, so a
part is either complete or absent; a rerun reads the committed parts, skips their videos and
predicts only the rest: a run killed at any point and rerun ends with exactly one prediction
per video. On Ray each actor loads the model once and answers batches of videos.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.store import FeatureStore

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema([
    ("video_id", pa.string()), ("model_id", pa.string()), ("text", pa.string()), ("explanation", pa.string()),
    ("labels", pa.list_(pa.string())),
    ("utterances", pa.list_(pa.struct([("index", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64()),
                                       ("labels", pa.list_(pa.string()))]))),
    ("well_formed", pa.bool_()), ("seconds", pa.float64()), ("predicted_at", pa.timestamp("ms", tz="UTC")),
])


# ---------------------------------------------------------------------------------------- model

def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The weights directory of ``path`` (a run directory, its export/, or a registry model)."""
    from model.weights import CONFIG_FILE, MODULES_FILE

    p = Path(path)
    for cand in (p, p / "export"):
        if (cand / CONFIG_FILE).is_file() and (cand / MODULES_FILE).is_file():
            return cand
    if not p.exists():
        raise FileNotFoundError(f"model {path}: no such directory")
    raise FileNotFoundError(f"model {path}: no {CONFIG_FILE} + {MODULES_FILE} here or in export/ "
                            "(a run directory written by `microemo train`, its export/, or a registry model)")


def model_id(path: str | os.PathLike) -> str:
    """A short content hash of a model's weights and config (16 hex digits)."""
    d = resolve_model_dir(path)
    h = hashlib.sha256()
    for f in sorted(x for x in d.rglob("*") if x.is_file() and x.suffix in (".safetensors", ".json")):
        h.update(str(f.relative_to(d)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def load_model(path: str | os.PathLike, device: str | None = None):
    """A ``MicroEmo`` in eval mode with the saved weights (LLM base from the config's source)."""
    import torch

    from model.microemo import MicroEmo
    from model.weights import load_config, load_weights

    d = resolve_model_dir(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(d)
    model = MicroEmo.from_config(cfg, device=device)
    load_weights(model, d)
    return model.eval()


def answer_record(video_id: str, answer, seconds: float = 0.0) -> dict:
    """A JSON-ready prediction (the columns of PREDICTION_SCHEMA without model_id/predicted_at)."""
    return {
        "video_id": video_id, "text": answer.raw, "explanation": answer.explanation, "labels": list(answer.labels),
        "utterances": [{"index": u.index, "start_s": u.start_s, "end_s": u.end_s, "labels": list(u.labels)}
                       for u in answer.utterances],
        "well_formed": bool(answer.well_formed), "seconds": float(seconds),
    }


def predict_samples(model, samples: Iterable[dict], batch_size: int = 4,
                    max_new_tokens: int | None = None) -> Iterator[dict]:
    """Answer records for samples (``jobs.data`` dicts), ``batch_size`` clips per generate call."""
    collate = model.collator(train=False)
    batch: list[dict] = []

    def run(chunk: list[dict]) -> list[dict]:
        t0 = time.perf_counter()
        answers = model.generate(collate(chunk).to(model.device), max_new_tokens=max_new_tokens)
        per = (time.perf_counter() - t0) / len(chunk)
        return [answer_record(s["video_id"], a, per) for s, a in zip(chunk, answers)]

    for s in samples:
        batch.append(s)
        if len(batch) >= batch_size:
            yield from run(batch)
            batch = []
    if batch:
        yield from run(batch)


# ------------------------------------------------------------------------------ prediction table

class PredictionTable:
    """A prediction table folder (``prediction_url``): committed parts, atomic part writes."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))

    def parts(self) -> list[str]:
        try:
            names = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if posixpath.basename(n).startswith("part-") and n.endswith(".parquet"))

    def done(self) -> set[str]:
        ids: set[str] = set()
        for p in self.parts():
            with self.fs.open(p, "rb") as f:
                ids.update(pq.read_table(f, columns=["video_id"]).column("video_id").to_pylist())
        return ids

    def write(self, rows: list[dict]) -> str:
        name = f"part-{uuid.uuid4().hex[:12]}.parquet"
        staging = posixpath.join(self.root, "_staging", name)
        final = posixpath.join(self.root, name)
        self.fs.makedirs(posixpath.dirname(staging), exist_ok=True)
        with self.fs.open(staging, "wb") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), f, compression="zstd")
        self.fs.mv(staging, final)  # local: a rename; S3: the final object appears whole
        return final

    def read(self) -> list[dict]:
        """Every committed prediction, one per video (the newest if a video somehow has two)."""
        rows: dict[str, dict] = {}
        for p in self.parts():
            with self.fs.open(p, "rb") as f:
                for r in pq.read_table(f).to_pylist():
                    old = rows.get(r["video_id"])
                    if old is None or _when(r) >= _when(old):
                        rows[r["video_id"]] = r
        return [rows[k] for k in sorted(rows)]


def _when(row: dict) -> float:
    return row["predicted_at"].timestamp() if row.get("predicted_at") else 0.0


@dataclass
class PredictConfig:
    model: str = ""  # run directory, export/ or registry model
    features: str = ""  # feature store
    split: str | None = "test"  # null = every usable video
    video_ids: list | None = None  # only these videos (within the split)
    out: str | None = None  # default: FEATURES/predictions/<model_id>-g<G>[-n<N>] (prediction_url)
    launcher: str = "ray"  # ray (actors, --address) or local (this process)
    address: str | None = None
    workers: int = 0  # Ray actors; 0 = one per CPU (at most one per batch)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    videos_per_part: int = 8
    batch_size: int = 4  # clips per generate call
    max_new_tokens: int | None = None  # default: the model config's llm.max_new_tokens
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.launcher not in ("ray", "local"):
            raise ValueError(f"launcher must be ray or local, got {self.launcher!r}")
        if self.videos_per_part < 1 or self.batch_size < 1:
            raise ValueError("videos_per_part and batch_size must be >= 1")


class PredictWorker:
    """Ray actor body (also used in-process): the model loaded once, one part written per batch."""

    def __init__(self, model: str, features: str, out: str, storage_options: dict, batch_size: int,
                 max_new_tokens: int | None, model_tag: str):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.model = load_model(model)
        self.store = FeatureStore(features, storage_options)
        self.table = PredictionTable(out, storage_options)
        self.batch_size, self.max_new_tokens, self.model_tag = batch_size, max_new_tokens, model_tag

    def predict(self, items: list[tuple[str, str]]) -> dict:
        """items: (shard, video_id); writes one part; returns {videos, seconds}."""
        from jobs.data import iter_samples

        t0 = time.perf_counter()
        by_shard: dict[str, set[str]] = {}
        for shard, vid in items:
            by_shard.setdefault(shard, set()).add(vid)
        rows = []
        now = datetime.now(timezone.utc)
        for shard, ids in sorted(by_shard.items()):
            samples = iter_samples(self.store, video_ids=ids, shards=[shard])
            for rec in predict_samples(self.model, samples, self.batch_size, self.max_new_tokens):
                rows.append(rec | {"model_id": self.model_tag, "predicted_at": now})
        if rows:
            self.table.write(rows)
        return {"videos": len(rows), "seconds": time.perf_counter() - t0}


def prediction_url(cfg: PredictConfig, tag: str) -> str:
    """Where a model's predictions go: ``cfg.out``, else ``FEATURES/predictions/<model_id>-g<G>[-n<N>]``.

    The folder is keyed by what decides an answer: the weights and config (``model_id``), the decoding
    code (``model.microemo.GENERATION_VERSION``) and ``max_new_tokens``, so a rerun with other settings
    predicts afresh instead of reusing answers made another way.
    """
    from model.microemo import GENERATION_VERSION

    key = f"{tag}-g{GENERATION_VERSION}" + (f"-n{cfg.max_new_tokens}" if cfg.max_new_tokens else "")
    return cfg.out or posixpath.join(cfg.features.rstrip("/"), "predictions", key)


def predict_store(cfg: PredictConfig, progress: bool = True) -> dict:
    """Predict every (remaining) video of ``cfg.split``; returns a summary with the table's URL."""
    from tqdm import tqdm

    from jobs.data import check_store, video_index

    t0 = time.perf_counter()
    tag = model_id(cfg.model)
    store = FeatureStore(cfg.features, cfg.storage_options)
    check_store(store)
    url = prediction_url(cfg, tag)
    table = PredictionTable(url, cfg.storage_options)
    done = table.done()
    wanted = set(cfg.video_ids) if cfg.video_ids is not None else None
    todo = [(s, v) for s, v in video_index(store, cfg.split) if v not in done and (wanted is None or v in wanted)]
    batches = [todo[i: i + cfg.videos_per_part] for i in range(0, len(todo), cfg.videos_per_part)]
    bar = tqdm(total=len(todo), unit="video", desc="predict", disable=not progress)
    args = (cfg.model, cfg.features, url, cfg.storage_options, cfg.batch_size, cfg.max_new_tokens, tag)
    predicted = 0
    if batches and cfg.launcher == "local":
        worker = PredictWorker(*args)
        for b in batches:
            predicted += worker.predict(b)["videos"]
            bar.update(len(b))
    elif batches:
        predicted = _predict_on_ray(cfg, args, batches, bar)
    bar.close()
    return {"model_id": tag, "predictions": url, "skipped": len(done), "predicted": predicted,
            "videos": len(done) + predicted, "seconds": time.perf_counter() - t0}


def _predict_on_ray(cfg: PredictConfig, args: tuple, batches: list, bar) -> int:
    import ray

    from pipeline.run import ray_address

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address(cfg.address), include_dashboard=False, log_to_driver=False, configure_logging=False)
        started = True
    try:
        n = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_worker))
        n = max(1, min(n, len(batches)))
        Actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=2,
                           max_task_retries=2)(PredictWorker)
        actors = [Actor.remote(*args) for _ in range(n)]
        idle, pending, queue, predicted = list(actors), {}, list(batches), 0
        while queue or pending:  # at most one batch per actor in flight
            while queue and idle:
                actor, batch = idle.pop(), queue.pop(0)
                pending[actor.predict.remote(batch)] = (actor, batch)
            ref = ray.wait(list(pending), num_returns=1)[0][0]
            actor, batch = pending.pop(ref)
            predicted += ray.get(ref)["videos"]  # a batch that fails after retries fails the run
            idle.append(actor)
            bar.update(len(batch))
        return predicted
    finally:
        if started:
            ray.shutdown()


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
