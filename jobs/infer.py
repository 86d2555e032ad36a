"""``microemo infer VIDEO --model RUN``: the whole chain on one video, in this process.

    VIDEO --pipeline.process.VideoProcessor--> rows (frames, faces, dynamics, audio, utterances)
          --jobs.data.assemble--> one sample --MicroEmo.generate--> explanation + labels

No Ray and no feature store: the same processor and sample assembly the corpus path uses,
so a clip gives the same features here as in ``preprocess``. Output (JSON)::

    {"video_id", "video", "duration_s", "model", "model_id",
     "labels": [...], "explanation": "...",
     "utterances": [{"index", "start_s", "end_s", "text", "labels"}],   transcript + predicted labels
     "micro_events_s": [...],           estimated from facial motion energy
     "clue_times": [[start, end], ...], times the explanation names
     "well_formed": bool, "raw": "...", "timings": {"pipeline_s", "generate_s", "load_s"}}
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pipeline.process import ProcessConfig


class InferInputError(ValueError):
    """The video (or its SRT) cannot be used: one line naming the file and why (exit 2)."""


@dataclass
class InferConfig:
    max_new_tokens: int | None = None  # default: the model config's llm.max_new_tokens
    device: str = "auto"  # auto, cpu or cuda
    process: ProcessConfig = field(default_factory=ProcessConfig)
    storage_options: dict = field(default_factory=dict)


def infer_video(video: str, model: str, cfg: InferConfig | None = None, srt: str | None = None,
                model_obj=None) -> dict:
    """Explain one video; see the module docstring for the result. ``model_obj`` reuses a loaded model."""
    import torch

    from jobs.data import assemble
    from jobs.emer import clue_times
    from jobs.predict import answer_record, load_model, model_id, resolve_model_dir
    from pipeline.dynamics import micro_events
    from pipeline.manifest import ManifestError, single_entry
    from pipeline.process import VideoProcessor
    from pipeline.store import config_hash

    cfg = cfg or InferConfig()
    model_dir = resolve_model_dir(model)  # fail on a bad --model before decoding anything
    try:
        entry = single_entry(video, srt=srt)
    except ManifestError as exc:
        raise InferInputError(str(exc)) from exc

    t0 = time.perf_counter()
    processor = VideoProcessor(cfg.process, cfg.storage_options, threads=max(cfg.process.threads, 0))
    rows = processor.process(entry, shard="infer", chash=config_hash({}))
    v = rows["videos"]
    if v["status"] == "error":
        raise InferInputError(f"{video}: {v['error_type']}: {v['error']}")
    dims = processor.dims()
    shapes = {"global": dims["frame"], "face": dims["face"][1],
              "dynamics": processor.encoder_info()["dynamics"]["dim"], "audio": dims["audio"][1]}
    sample = assemble(v, rows["frames"], rows["audio"], rows["utterances"], None, shapes)
    t_pipeline = time.perf_counter() - t0

    t1 = time.perf_counter()
    device = None if cfg.device == "auto" else cfg.device
    net = model_obj if model_obj is not None else load_model(model_dir, device)
    t_load = time.perf_counter() - t1
    t2 = time.perf_counter()
    with torch.inference_mode():
        answer = net.generate(net.collator(train=False)([sample]).to(net.device),
                              max_new_tokens=cfg.max_new_tokens)[0]
    t_generate = time.perf_counter() - t2

    rec = answer_record(entry.video_id, answer)
    duration = float(sample["duration_s"] or (sample["frame_pts"].max() if len(sample["frame_pts"]) else 0.0))
    transcript = sorted(sample["utterances"], key=lambda u: (float(u["start_s"]), float(u["end_s"])))
    by_index = {u["index"]: u for u in rec["utterances"]}
    utterances = []
    for i, u in enumerate(transcript, 1):
        start, end = _clamp(float(u["start_s"]), duration), _clamp(float(u["end_s"]), duration)
        utterances.append({"index": i, "start_s": start, "end_s": end, "text": u.get("text") or "",
                           "labels": list(by_index[i]["labels"]) if i in by_index else []})
    return {
        "video_id": entry.video_id, "video": video, "duration_s": duration, "status": v["status"],
        "model": str(model), "model_id": model_id(model_dir),
        "labels": rec["labels"], "explanation": rec["explanation"], "utterances": utterances,
        "micro_events_s": [_clamp(t, duration) for t in micro_events(
            sample["frame_pts"], sample["motion_energy"], offsets_s=sample["motion_peak_offset_s"])],
        "clue_times": [[_clamp(s, duration), _clamp(e, duration)]
                       for s, e in clue_times(rec["explanation"])],
        "well_formed": rec["well_formed"], "raw": rec["text"],
        "timings": {"pipeline_s": t_pipeline, "load_s": t_load, "generate_s": t_generate},
        "_sample": sample,  # for plotting; dropped before printing
    }


def _clamp(t: float, duration: float) -> float:
    return round(min(max(float(t), 0.0), duration), 3)


def plot_result(result: dict, out_png: str) -> str:
    """The timeline PNG of an ``infer_video`` result."""
    from jobs.plots import timeline

    s = result["_sample"]
    pred = {"labels": result["labels"], "explanation": result["explanation"],
            "utterances": [{"index": u["index"], "labels": u["labels"]} for u in result["utterances"]]}
    return str(timeline(out_png, video_id=result["video_id"], duration_s=result["duration_s"],
                        utterances=result["utterances"], prediction=pred, pts_s=s["frame_pts"],
                        energy=s["motion_energy"], events_s=result["micro_events_s"],
                        pred_clues=[tuple(c) for c in result["clue_times"]]))
