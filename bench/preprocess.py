"""Preprocessing: every stage alone, the Ray pipeline with 1 and 2 workers, the job's peak memory
at two corpus sizes and Ray's object-store spill, all on the same synthetic corpus in one run.

Stages alone: one process with one compute thread in every library (the environment of a
1-CPU pipeline worker, ``ProcessConfig.threads``), one video at a time, each stage timed separately with the pipeline's own models (``VideoProcessor``):
decode (ffprobe + sampled frames + audio), faces (detection, speaker tracking, landmarks on the
window frames, dynamics, alignment), the frame encoder, the face encoder, the audio encoder,
and utterances (manifest / SRT / ASR). Every rate is in sampled frames per second: how fast
the corpus would pass through that stage alone.

Pipeline: each run is one job in a process of its own (``microemo preprocess``'s code path:
a local Ray started in the job, ``videos_per_shard`` videos per task), whose whole process
tree (driver, Ray's services, worker actors, their ffmpeg children) is sampled for memory and
CPU time. The 1- and 2-worker runs are made twice: with each worker's libraries capped at the
CPUs it reserved (``threads=0``, the default) and with the libraries' own defaults
(``threads=-1``: OpenCV, CTranslate2 and ffmpeg start a thread per core in every worker), the
setting before the cap existed.

Child entry points (run by ``main`` through ``bench.child``)::

    python -m bench.preprocess stages MANIFEST RESULT_JSON
    python -m bench.preprocess pipeline MANIFEST OUT WORKERS VIDEOS_PER_SHARD THREADS RESULT_JSON
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import child, corpus
from bench.report import Goal, Result

MiB = 1 << 20


@dataclass
class Sizes:
    videos: int = 20  # corpus for the stages alone and 1 vs 2 workers; the small memory point
    large: int = 80  # the large memory point
    videos_per_shard: int = 2  # small tasks: work spreads evenly over 2 workers


FULL, QUICK = Sizes(), Sizes(videos=4, large=8)

GOAL_SLOWEST = Goal(">=", 0.85)  # pipeline throughput / slowest stage alone
GOAL_SCALING = Goal(">=", 1.7)  # 2 workers / 1 worker
GOAL_GROWTH = Goal("<", 15.0)  # % more peak memory at the large corpus than at the small one
GOAL_SPILL = Goal("<=", 0.0)  # MiB spilled from Ray's object store

STAGES = ("decode", "faces", "frame_encoder", "face_encoder", "audio_encoder", "utterances")


# ---------------------------------------------------------------------------- child processes

def stages_alone(manifest: str) -> dict:
    """Seconds per stage over the whole corpus and the number of sampled frames.

    The first video is run once untimed first (model warm-up: lazy loads, first allocations).
    """
    import numpy as np

    from pipeline.decode import decode_audio, iter_samples, probe
    from pipeline.dynamics import face_dynamics
    from pipeline.faces import SpeakerTracker, align, alignment_matrix
    from pipeline.manifest import read_manifest
    from pipeline.process import ProcessConfig, VideoProcessor
    from pipeline.utterances import utterances_for

    proc = VideoProcessor(ProcessConfig(), threads=1)  # as in a 1-CPU pipeline worker
    cfg = proc.cfg  # with the thread cap in its decode settings
    fc, batch = cfg.faces, cfg.encoders.batch_size

    def one(entry, t: dict[str, float]) -> int:
        t0 = time.perf_counter()
        info = probe(entry.uri, cfg.decode)
        samples = list(iter_samples(info, cfg.decode))
        audio = decode_audio(info, cfg.decode)
        t1 = time.perf_counter()
        crops, tracker = [], SpeakerTracker()
        for s in samples:
            img = s.image
            face, _ = tracker.update(proc.detector.detect(img), (img.shape[1], img.shape[0]))
            if face is not None:
                m = alignment_matrix(face.landmarks, fc.crop_size, fc.margin)
                wl = (np.stack([proc.detector.landmarks(f, face.bbox) for f in s.window])
                      if fc.window_landmarks else None)
                face_dynamics(s.window, s.window_pts_s, s.pts_s, m, face.landmarks, wl, fc.crop_size)
                crops.append(align(img, m, fc.crop_size))
        t2 = time.perf_counter()
        images = np.stack([s.image for s in samples])
        for i in range(0, len(images), batch):
            proc.frame_encoder.encode(images[i: i + batch])
        t3 = time.perf_counter()
        for i in range(0, len(crops), batch):
            proc.face_encoder.encode(np.stack(crops[i: i + batch]))
        t4 = time.perf_counter()
        if audio.size:
            proc.audio_encoder.encode(audio)
        t5 = time.perf_counter()
        utterances_for(entry, audio, cfg.decode.audio_rate, cfg.asr)
        t6 = time.perf_counter()
        for k, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            t[k] += dt
        return len(samples)

    entries = read_manifest(manifest).valid
    one(entries[0], dict.fromkeys(STAGES, 0.0))
    seconds = dict.fromkeys(STAGES, 0.0)
    frames = sum(one(e, seconds) for e in entries)
    return {"seconds": seconds, "frames": frames}


def object_store_stats() -> dict:
    """Spill and use counters of the running Ray cluster (bytes, objects), or {"error": ...}.

    Ray 2.x serves them in the raylet's node-stats reply (``store_stats``), the source of
    ``ray memory --stats-only``; the call is an internal API, hence the guard.
    """
    import ray

    try:
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        s = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
        return {"spilled_bytes": int(s.spilled_bytes_total), "spilled_objects": int(s.spilled_objects_total),
                "restored_bytes": int(s.restored_bytes_total), "store_bytes_used": int(s.object_store_bytes_used),
                "store_bytes_avail": int(s.object_store_bytes_avail)}
    except Exception as exc:  # noqa: BLE001 - internal API: absent or changed in another Ray version
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}


def pipeline_job(manifest: str, out: str, workers: int, videos_per_shard: int, threads: int = 0) -> dict:
    """Preprocess ``manifest`` into a fresh ``out`` on a local Ray of ``workers`` CPUs; seconds
    exclude Ray's start (they include starting the actors and loading their models)."""
    import ray

    from pipeline.process import ProcessConfig
    from pipeline.run import PreprocessConfig, preprocess

    shutil.rmtree(out, ignore_errors=True)
    # address="local": a new Ray for this job, never one that `ray start` left running on the machine
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        t0 = time.perf_counter()
        s = preprocess(PreprocessConfig(manifest=manifest, out=out, workers=workers, videos_per_shard=videos_per_shard,
                                        process=ProcessConfig(threads=threads)), progress=False)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "frames": s["frames"], "processed": s["processed"], "failed": s["failed"],
                "status": s["status"], "stage_seconds": s["stage_seconds"], "object_store": object_store_stats()}
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------- the benchmark

def _env() -> dict[str, str]:
    """A pipeline worker's environment: Ray gives each 1-CPU worker one OpenMP thread."""
    return dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")


def _pipeline(name: str, manifest: Path, store: Path, workers: int, per_shard: int, logs: Path,
              threads: int = 0) -> dict:
    summary, m = child.run("bench.preprocess", ["pipeline", str(manifest.resolve()), str(store.resolve()),
                                                str(workers), str(per_shard), str(threads)], logs, f"pipeline_{name}",
                           _env())
    top = sorted(m.processes.values(), key=lambda p: -p.peak_rss)[:8]
    return {**summary, "frames_per_s": summary["frames"] / summary["seconds"], "peak_rss_sum": m.peak_rss_sum,
            "peak_anon_sum": m.peak_anon_sum, "memory_samples": m.samples, "processes": len(m.processes),
            "cpu_seconds": {k: round(v, 2) for k, v in sorted(m.cpu_seconds().items(), key=lambda kv: -kv[1])},
            "largest_processes_peak_rss_mib": {f"{p.name}[{p.pid}]": round(p.peak_rss / MiB) for p in top}}


def main(ctx) -> Result:
    sizes = QUICK if ctx.quick else FULL
    res = Result("preprocess", ctx.quick, details={"sizes": asdict(sizes)})
    out, logs = ctx.out, ctx.out / "logs"
    small, large = corpus.manifest(out, sizes.videos), corpus.manifest(out, sizes.large)
    print(f"== preprocess: {sizes.videos} clips (memory also at {sizes.large}), {os.cpu_count()} CPUs ==", flush=True)

    print("   stages alone ...", flush=True)
    alone, _ = child.run("bench.preprocess", ["stages", str(small.resolve())], logs, "stages_alone", _env())
    seconds, frames = alone["seconds"], alone["frames"]
    rates = {k: frames / s for k, s in seconds.items()}
    res.details["stages_alone"] = {**alone, "frames_per_s": rates}
    for k in STAGES:
        res.add(f"stage alone: {k.replace('_', ' ')}", rates[k], "frames/s")
    slowest = min(rates, key=rates.get)
    back_to_back = frames / sum(seconds.values())

    runs = {}
    # the 2-worker run on the small corpus writes the store the training benchmark reuses
    for name, manifest, workers, store, threads in (
            ("w1", small, 1, out / "pipeline_w1", 0),
            ("w2", small, 2, corpus.store_path(out, sizes.videos), 0),
            ("w1_lib_threads", small, 1, out / "pipeline_w1_lib", -1),
            ("w2_lib_threads", small, 2, out / "pipeline_w2_lib", -1),
            ("w2_large", large, 2, out / f"pipeline_w2_{sizes.large}", 0)):
        print(f"   pipeline {name}: {workers} worker(s), {manifest.name}, threads={threads} ...", flush=True)
        runs[name] = _pipeline(name, manifest, store, workers, sizes.videos_per_shard, logs, threads)
        runs[name]["cpu_cores_busy"] = sum(runs[name]["cpu_seconds"].values()) / runs[name]["seconds"]
        print(f"     {runs[name]['frames_per_s']:.2f} frames/s; CPU seconds by process: {runs[name]['cpu_seconds']}",
              flush=True)
    res.details["pipeline"] = runs

    w1, w2 = runs["w1"]["frames_per_s"], runs["w2"]["frames_per_s"]
    res.add("pipeline, 1 worker", w1, "frames/s")
    res.add("pipeline, 2 workers", w2, "frames/s")
    res.add("1-worker pipeline ÷ all stages back to back", w1 / back_to_back, "×",
            note=f"stages back to back: {back_to_back:.2f} frames/s")
    res.add(f"1-worker pipeline ÷ slowest stage alone ({slowest.replace('_', ' ')})", w1 / rates[slowest], "×",
            GOAL_SLOWEST)
    res.add("2 workers ÷ 1 worker", w2 / w1, "×", GOAL_SCALING)
    for name in ("w1", "w2"):
        r = runs[name]
        res.add(f"cores busy, {name[1]} worker(s) (CPU seconds of the job ÷ wall seconds)", r["cpu_cores_busy"], "cores",
                note=", ".join(f"{k} {v:.0f} s" for k, v in r["cpu_seconds"].items() if v >= 0.5))
    lw1, lw2 = runs["w1_lib_threads"]["frames_per_s"], runs["w2_lib_threads"]["frames_per_s"]
    res.add("before the thread cap (libraries' default threads): pipeline, 1 worker", lw1, "frames/s")
    res.add("before the thread cap (libraries' default threads): pipeline, 2 workers", lw2, "frames/s")
    res.add("before the thread cap: 2 workers ÷ 1 worker", lw2 / lw1, "×")
    res.add("2 workers, capped ÷ libraries' default threads", w2 / lw2, "×")
    small_run, large_run = runs["w2"], runs["w2_large"]
    for n, r in ((sizes.videos, small_run), (sizes.large, large_run)):
        res.add(f"peak RSS of the job (summed over its processes), {n} clips", r["peak_rss_sum"] / MiB, "MiB")
    res.add(f"memory growth {sizes.videos} → {sizes.large} clips (summed RSS)",
            100 * (large_run["peak_rss_sum"] / small_run["peak_rss_sum"] - 1), "%", GOAL_GROWTH)
    res.add(f"private memory growth {sizes.videos} → {sizes.large} clips (summed RssAnon)",
            100 * (large_run["peak_anon_sum"] / small_run["peak_anon_sum"] - 1), "%")
    stats = [r["object_store"] for r in runs.values()]
    broken = [s["error"] for s in stats if "spilled_bytes" not in s]
    if broken:
        res.skip("object-store spill", f"Ray's store stats unreadable: {broken[0]}")
    else:
        res.add("object-store spill (all runs)", sum(s["spilled_bytes"] for s in stats) / MiB, "MiB", GOAL_SPILL)
    return res


def _child(argv: list[str]) -> int:
    what, *args, result = argv
    if what == "stages":
        child.write_result(result, stages_alone(args[0]))
    elif what == "pipeline":
        manifest, out, workers, per_shard, threads = args
        child.write_result(result, pipeline_job(manifest, out, int(workers), int(per_shard), int(threads)))
    else:
        raise SystemExit(f"unknown child {what!r}")
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
