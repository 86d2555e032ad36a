"""``microemo preprocess``: a manifest of videos -> the Parquet feature store, on Ray.

The driver reads and validates the manifest, recovers the store from any crash, works out
which videos are already committed with the same source fingerprint and configuration
(skipped), new (processed) or changed (their old rows are removed first), and hands batches
of ``videos_per_shard`` videos to a pool of Ray actors. Each actor loads its models once
and writes one shard per batch (see ``pipeline.store`` for the commit protocol). At most
one batch per actor is in flight, so memory stays bounded however long the manifest is.
A crashed actor is restarted and its batch retried (``max_retries``); a batch that still
fails is recorded as ``worker_crashed`` for each of its videos and retried on the next run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.manifest import ManifestEntry, read_manifest
from pipeline.process import (RETRYABLE, ProcessConfig, VideoProcessor, config_for_hash, source_fingerprint)
from pipeline.store import PIPELINE_VERSION, FeatureStore, ShardRows, config_hash, schemas

log = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    manifest: str = ""
    out: str = ""
    address: str | None = None  # Ray cluster address; null = $RAY_ADDRESS (set in Ray jobs), else a new local Ray
    workers: int = 0  # Ray actors; 0 = one per CPU of the cluster
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    videos_per_shard: int = 8
    overwrite: bool = False
    strict_manifest: bool = False  # any bad manifest row rejects the whole manifest
    max_error_rate: float = 0.25  # exit 1 when more than this fraction of processed videos fail
    max_retries: int = 2  # actor restarts / task retries after a worker crash
    storage_options: dict = field(default_factory=dict)  # fsspec options for s3:// (endpoint, key, ...)
    process: ProcessConfig = field(default_factory=ProcessConfig)

    def __post_init__(self):
        if self.videos_per_shard < 1:
            raise ValueError("videos_per_shard must be at least 1")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError("max_error_rate must be in [0, 1]")
        if self.workers < 0:
            raise ValueError("workers must be >= 0")


class ShardWorker:
    """Ray actor body: models loaded once; one shard written per batch."""

    def __init__(self, process_cfg: ProcessConfig, out: str, storage_options: dict, cpus: float = 1.0):
        self.processor = VideoProcessor(process_cfg, storage_options, threads=worker_threads(process_cfg, cpus))
        self.store = FeatureStore(out, storage_options)
        self.schemas = schemas(self.processor.dims(), {k: v["id"] for k, v in self.processor.encoder_info().items()
                                                       if k in ("frame", "face", "audio")},
                               self.processor.encoder_info()["dynamics"]["dim"])

    def encoder_info(self) -> dict:
        return self.processor.encoder_info()

    def process_batch(self, entries: list[ManifestEntry], chash: str, shard: str | None = None) -> dict:
        """Process ``entries`` and commit them as shard ``shard``. The driver names the shard, so a batch
        Ray retries after its actor died (even after the commit, before the reply) rewrites the same
        shard instead of adding a second copy of its videos."""
        shard = shard or self.store.new_shard_name()
        rows = ShardRows.empty()
        for entry in entries:
            out = self.processor.process(entry, shard, chash)
            rows.videos.append(out["videos"])
            for name in ("frames", "utterances", "audio", "labels"):
                getattr(rows, name).extend(out[name])
        self.store.write_shard(shard, rows.to_tables(self.schemas))
        result = {"shard": shard, "videos": [_brief(v) for v in rows.videos], "frames": len(rows.frames)}
        del rows
        release_memory()
        return result


def release_memory() -> None:
    """Give a finished batch's memory back to the OS: collect cycles, then glibc's ``malloc_trim``.

    A worker's batches allocate and free hundreds of MB (decoded windows, feature rows); glibc keeps
    freed pages in its arenas, so without trimming a long-lived worker's RSS creeps up with the
    largest batches it has seen. A no-op where glibc is absent.
    """
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl)
        pass


def ray_address(address: str | None) -> str:
    """The address for ``ray.init``: the given one, else ``$RAY_ADDRESS`` (a Ray job's entrypoint has it),
    else ``"local"``: a new Ray for this process, never a cluster a stray ``ray start`` left on the host."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def worker_threads(cfg: ProcessConfig, cpus: float) -> int:
    """Compute threads of a worker that reserved ``cpus`` CPUs (``ProcessConfig.threads``; 0 = library defaults)."""
    if cfg.threads > 0:
        return cfg.threads
    return 0 if cfg.threads < 0 else max(1, math.ceil(cpus))


def _brief(row: dict) -> dict:
    keys = ("video_id", "status", "error_type", "error", "n_frames", "t_fetch_s", "t_decode_s", "t_faces_s",
            "t_encode_s", "t_audio_s", "t_total_s")
    return {k: row.get(k) for k in keys}


def _fingerprints(entries: list[ManifestEntry], storage_options: dict) -> dict[str, str | None]:
    def one(e: ManifestEntry):
        try:
            return e.video_id, source_fingerprint(e.uri, storage_options)
        except OSError:
            return e.video_id, None  # missing now: the worker records why

    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, entries))


def plan(cfg: PreprocessConfig, entries: list[ManifestEntry], store: FeatureStore, chash: str
         ) -> tuple[list[ManifestEntry], list[ManifestEntry], dict[str, set[str]]]:
    """(todo, skipped, stale) where stale maps shard -> ids whose old rows must go first."""
    committed = store.committed()
    prints = _fingerprints([e for e in entries if e.ok], cfg.storage_options)
    todo, skipped, stale = [], [], {}
    for e in entries:
        old = committed.get(e.video_id)
        if old is not None:
            same = (old["config_hash"] == chash and old["error_type"] not in RETRYABLE
                    and (not e.ok or old["source_fingerprint"] == prints.get(e.video_id)))
            if same:
                skipped.append(e)
                continue
            stale.setdefault(old["shard"], set()).add(e.video_id)
        todo.append(e)
    return todo, skipped, stale


def preprocess(cfg: PreprocessConfig, progress: bool = True) -> dict:
    """Run the pipeline; returns the summary (also stored in the lineage file)."""
    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    manifest = read_manifest(cfg.manifest, strict=cfg.strict_manifest, storage_options=cfg.storage_options)
    store = FeatureStore(cfg.out, cfg.storage_options)
    if cfg.overwrite:
        store.clear()
    recovered = store.recover()
    chash = config_hash({"process": config_for_hash(cfg.process), "pipeline": PIPELINE_VERSION})
    todo, skipped, stale = plan(cfg, manifest.entries, store, chash)
    for shard, ids in stale.items():
        store.drop_videos(shard, ids)

    started_ray = False
    # Ray reports anonymous usage over the internet unless told not to; a data pipeline
    # should not phone home by default (set RAY_USAGE_STATS_ENABLED=1 to allow it).
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address=ray_address(cfg.address), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                 configure_logging=False)
        started_ray = True
    try:
        n_workers = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1) // cfg.cpus_per_worker))
        batches = [todo[i: i + cfg.videos_per_shard] for i in range(0, len(todo), cfg.videos_per_shard)]
        n_workers = max(1, min(n_workers, len(batches))) if batches else 0
        Actor = ray.remote(num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker,
                           max_restarts=cfg.max_retries, max_task_retries=cfg.max_retries)(ShardWorker)
        actors = [Actor.remote(cfg.process, cfg.out, cfg.storage_options, cfg.cpus_per_worker) for _ in range(n_workers)]
        encoders = ray.get(actors[0].encoder_info.remote()) if actors else store.read_lineage().get("encoders", {})
        results: list[dict] = []
        bar = tqdm(total=len(todo), unit="video", desc="preprocess", disable=not progress)
        frames_done, errors, t_run = 0, 0, time.perf_counter()
        pending: dict = {}
        queue = list(batches)
        idle = list(actors)
        while queue or pending:
            while queue and idle:
                actor, batch = idle.pop(), queue.pop(0)
                pending[actor.process_batch.remote(batch, chash, FeatureStore.new_shard_name())] = (actor, batch)
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            actor, batch = pending.pop(ref)
            try:
                res = ray.get(ref)
                idle.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as exc:
                log.warning("batch of %d videos failed after retries: %s", len(batch), exc)
                res = _record_crash(cfg, store, batch, chash, encoders, exc)
                # the actor may be dead for good; replace it so the pool keeps its size
                idle.append(Actor.remote(cfg.process, cfg.out, cfg.storage_options, cfg.cpus_per_worker))
            results.append(res)
            frames_done += res["frames"]
            errors += sum(1 for v in res["videos"] if v["status"] == "error")
            bar.update(len(batch))
            elapsed = max(1e-6, time.perf_counter() - t_run)
            bar.set_postfix(frames_s=f"{frames_done / elapsed:.1f}", errors=errors)
        bar.close()
    finally:
        if started_ray:
            ray.shutdown()

    summary = _summarize(manifest, todo, skipped, results, recovered, time.perf_counter() - t0)
    summary["error_rate_exceeded"] = summary["processed"] > 0 and \
        summary["failed"] / summary["processed"] > cfg.max_error_rate
    lineage = store.read_lineage()
    runs = lineage.get("runs", [])[-49:] + [{k: summary[k] for k in ("finished_at", "processed", "skipped", "failed",
                                                                      "seconds", "frames")}]
    committed = store.committed()
    from jobs.config import redact, to_dict  # plain-data view of the config dataclass

    store.write_lineage({
        "pipeline_version": PIPELINE_VERSION, "config_hash": chash, "encoders": encoders,
        "config": redact(to_dict(cfg)), "manifest": cfg.manifest,
        "counts": dict(Counter(r["status"] for r in committed.values())), "videos": len(committed),
        "runs": runs,
    })
    return summary


def _record_crash(cfg, store, batch, chash, encoders, exc) -> dict:
    """Every video of a batch whose worker kept crashing gets an error row (retried next run)."""
    from datetime import datetime, timezone

    shard = store.new_shard_name()
    rows = ShardRows.empty()
    for e in batch:
        rows.videos.append({"video_id": e.video_id, "uri": e.uri, "manifest_line": e.line, "status": "error",
                            "error_type": "worker_crashed", "error": f"{type(exc).__name__}: {str(exc)[:300]}",
                            "config_hash": chash, "shard": shard, "processed_at": datetime.now(timezone.utc),
                            "pipeline_version": PIPELINE_VERSION})
    dims = {k: (encoders[k]["tokens"], encoders[k]["dim"]) for k in ("frame", "face", "audio")}
    ids = {k: encoders[k]["id"] for k in ("frame", "face", "audio")}
    store.write_shard(shard, rows.to_tables(schemas(dims, ids, encoders["dynamics"]["dim"])))
    return {"shard": shard, "videos": [_brief(v) for v in rows.videos], "frames": 0}


def _summarize(manifest, todo, skipped, results, recovered, seconds) -> dict:
    from datetime import datetime, timezone

    videos = [v for r in results for v in r["videos"]]
    status = Counter(v["status"] for v in videos)
    errors = Counter(v["error_type"] for v in videos if v["status"] == "error")
    examples = {}
    for v in videos:
        if v["status"] == "error" and v["error_type"] not in examples:
            examples[v["error_type"]] = f"{v['video_id']}: {v['error']}"
    stage = {k: sum(v.get(k) or 0.0 for v in videos) for k in ("t_fetch_s", "t_decode_s", "t_faces_s", "t_encode_s",
                                                                "t_audio_s", "t_total_s")}
    frames = sum(r["frames"] for r in results)
    return {
        "manifest_rows": len(manifest.entries), "processed": len(videos), "skipped": len(skipped),
        "failed": status.get("error", 0), "status": dict(status), "errors": dict(errors.most_common()),
        "error_examples": examples, "frames": frames, "seconds": round(seconds, 2),
        "videos_per_s": round(len(videos) / seconds, 3) if seconds else 0.0,
        "frames_per_s": round(frames / seconds, 2) if seconds else 0.0,
        "stage_seconds": {k: round(v, 2) for k, v in stage.items()}, "recovered": recovered,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def format_summary(s: dict) -> str:
    lines = [f"{s['manifest_rows']} manifest rows: {s['processed']} processed, {s['skipped']} skipped "
             f"(already committed), {s['failed']} failed",
             "status: " + (", ".join(f"{k} {v}" for k, v in sorted(s["status"].items())) or "-")]
    if s["errors"]:
        lines.append("errors by type:")
        for k, v in s["errors"].items():
            lines.append(f"  {k:<18} {v:>5}   e.g. {s['error_examples'][k][:110]}")
    st = s["stage_seconds"]
    lines.append(f"throughput: {s['frames_per_s']:.1f} sampled frames/s, {s['videos_per_s']:.2f} videos/s "
                 f"over {s['seconds']:.1f} s")
    lines.append("worker time by stage (s): " + ", ".join(f"{k[2:-2]} {v:.1f}" for k, v in st.items()))
    rec = s["recovered"]
    if any(rec.values()):
        lines.append(f"recovered from an earlier crash: {rec['finished']} shard(s) completed, "
                     f"{rec['dropped']} unfinished dropped, {rec['orphans']} orphan file(s) removed")
    return "\n".join(lines)
