"""Preprocessing throughput: each stage alone, one process, and Ray with 1 and 2 workers, on the
same synthetic corpus in one run. Prints sampled frames per second and the ratios that matter:
how close the pipeline gets to its slowest stage, and how it scales with workers."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np


def _corpus(out: Path, n: int) -> Path:
    from pipeline.synth.corpus import SynthConfig, generate_corpus

    d = out / f"corpus{n}"
    generate_corpus(SynthConfig(out=str(d), videos=n, seed=123), progress=False)
    return d


def _stages_alone(manifest: Path) -> dict[str, tuple[float, int]]:
    """Seconds and frames for decode, faces (detect + landmarks + dynamics) and encoders, each
    timed on its own over the whole corpus, in this process (1 thread)."""
    from pipeline.decode import DecodeConfig, decode_audio, iter_samples, probe
    from pipeline.dynamics import face_dynamics
    from pipeline.encoders import build_encoder
    from pipeline.faces import DlibFaceDetector, SpeakerTracker, align, alignment_matrix
    from pipeline.manifest import read_manifest

    entries = read_manifest(manifest).valid
    cfg = DecodeConfig()
    det = DlibFaceDetector()
    frame_enc, face_enc, audio_enc = (build_encoder(k, None, "cpu") for k in ("frame", "face", "audio"))
    t = {"decode": 0.0, "faces": 0.0, "encode": 0.0}
    frames = 0
    for e in entries:
        t0 = time.perf_counter()
        info = probe(e.uri, cfg)
        samples = list(iter_samples(info, cfg))
        audio = decode_audio(info, cfg)
        t["decode"] += time.perf_counter() - t0
        frames += len(samples)
        t0 = time.perf_counter()
        crops, tracker = [], SpeakerTracker()
        for s in samples:
            face, _ = tracker.update(det.detect(s.image), (s.image.shape[1], s.image.shape[0]))
            if face is not None:
                m = alignment_matrix(face.landmarks)
                wl = np.stack([det.landmarks(f, face.bbox) for f in s.window])
                face_dynamics(s.window, s.window_pts_s, s.pts_s, m, face.landmarks, wl)
                crops.append(align(s.image, m))
        t["faces"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        frame_enc.encode(np.stack([s.image for s in samples]))
        if crops:
            face_enc.encode(np.stack(crops))
        audio_enc.encode(audio)
        t["encode"] += time.perf_counter() - t0
    return {k: (v, frames) for k, v in t.items()}


def _pipeline(manifest: Path, out: Path, workers: int) -> tuple[float, int, dict]:
    import ray

    from pipeline.run import PreprocessConfig, preprocess

    shutil.rmtree(out, ignore_errors=True)
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        t0 = time.perf_counter()
        s = preprocess(PreprocessConfig(manifest=str(manifest), out=str(out), workers=workers, videos_per_shard=2),
                       progress=False)
        return time.perf_counter() - t0, s["frames"], s
    finally:
        ray.shutdown()


def main(args) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    corpus = _corpus(out, args.videos)
    manifest = corpus / "manifest.jsonl"
    print(f"== preprocess benchmark: {args.videos} synthetic clips, {os.cpu_count()} CPUs ==")
    stages = _stages_alone(manifest)
    for name, (sec, n) in stages.items():
        print(f"stage alone  {name:<8} {n / sec:7.1f} frames/s  ({sec:6.1f} s for {n} sampled frames)")
    serial = sum(sec for sec, _ in stages.values())
    n = next(iter(stages.values()))[1]
    slowest = max(stages, key=lambda k: stages[k][0])
    print(f"stages back to back      {n / serial:7.1f} frames/s (the bound for one worker)")
    runs = {}
    for w in (1, 2):
        sec, frames, summary = _pipeline(manifest, out / f"fs{w}", w)
        runs[w] = frames / sec
        st = summary["stage_seconds"]
        print(f"ray pipeline {w} worker{'s' if w > 1 else ' '}  {runs[w]:7.1f} frames/s  ({sec:6.1f} s incl. Ray start "
              f"and model loads; worker stage seconds: decode {st['t_decode_s']:.1f}, faces {st['t_faces_s']:.1f}, "
              f"encode {st['t_encode_s']:.1f}, audio+asr {st['t_audio_s']:.1f})")
    print(f"ratio  1-worker pipeline / stages back to back: {runs[1] / (n / serial):.2f}")
    print(f"ratio  1-worker pipeline / slowest stage alone ({slowest}): {runs[1] / (n / stages[slowest][0]):.2f}")
    print(f"ratio  2 workers / 1 worker: {runs[2] / runs[1]:.2f} (2 cores; ideal 2.0)")
