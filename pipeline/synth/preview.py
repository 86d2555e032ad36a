"""Showing a synthetic corpus: a text summary and a contact sheet of planted micro-events."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from pipeline.synth.corpus import SPLITS, read_jsonl
from pipeline.synth.emotions import EMOTION_NAMES


def format_summary(summary: dict) -> str:
    """A compact table: clips per emotion and split, then the other breakdowns."""
    lines = [f"{summary['videos']} clips, {summary['hours'] * 60:.1f} min of video "
             f"(clip length {summary['duration_s']['min']:.1f}-{summary['duration_s']['max']:.1f} s, "
             f"mean {summary['duration_s']['mean']:.1f} s), {summary['utterances']} utterances, "
             f"{summary['micro_events']} planted micro-expressions, {summary['blinks']} blinks"]
    by_split = summary.get("by_split_emotion")
    header = f"{'emotion':<11}" + "".join(f"{s:>7}" for s in SPLITS) + f"{'total':>7}"
    lines += ["", header, "-" * len(header)]
    for emo in EMOTION_NAMES:
        row = [by_split.get(s, {}).get(emo, 0) for s in SPLITS] if by_split else [0, 0, 0]
        total = summary["by_emotion"].get(emo, 0)
        if total:
            lines.append(f"{emo:<11}" + "".join(f"{n:>7}" for n in row) + f"{total:>7}")
    lines.append(f"{'total':<11}" + "".join(f"{summary['by_split'].get(s, 0):>7}" for s in SPLITS)
                 + f"{summary['videos']:>7}")
    lines.append("")
    lines.append("emotion carried by: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_mode"].items())))
    lines.append("utterances given as: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_utterance_source"].items())))
    lines.append("speakers: " + ", ".join(f"{k} {v}" for k, v in sorted(summary["by_identity"].items())))
    return "\n".join(lines)


def _read_frame(path: Path, index: int) -> np.ndarray | None:
    cap = cv2.VideoCapture(str(path))
    try:
        cap.set(cv2.CAP_PROP_POS_FRAMES, index)
        ok, frame = cap.read()
        return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB) if ok else None
    finally:
        cap.release()


def contact_sheet(corpus_dir: str | Path, out_png: str | Path, max_clips: int = 6) -> Path | None:
    """For clips with planted micro-expressions: the frame before the event, at its peak, and a
    timeline of utterances and events. Returns the PNG path, or None when no clip has an event."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpus_dir = Path(corpus_dir)
    truths = [t for t in read_jsonl(corpus_dir / "truth.jsonl") if any(e["emotional"] for e in t["micro_events"])]
    truths = truths[:max_clips]
    if not truths:
        return None
    fig, axes = plt.subplots(len(truths), 3, figsize=(12, 2.6 * len(truths)),
                             gridspec_kw={"width_ratios": [1, 1, 2.2]}, squeeze=False)
    for row, t in zip(axes, truths):
        ev = next(e for e in t["micro_events"] if e["emotional"])
        mp4 = corpus_dir / "videos" / f"{t['video_id']}.mp4"
        before = _read_frame(mp4, max(0, int(round((ev["onset_s"] - 0.12) * t["fps"]))))
        peak = _read_frame(mp4, int(round(ev["peak_s"] * t["fps"])))
        x0, y0, x1, y1 = ev["bbox_px"]
        for ax, img, title in ((row[0], before, f"{t['video_id']} before"), (row[1], peak, f"peak {ev['peak_s']:.2f} s")):
            if img is not None:
                ax.imshow(img)
            ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="yellow", lw=1.2))
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        ax = row[2]
        for u in t["utterances"]:
            color = "tab:red" if u["emotional"] else "tab:gray"
            ax.barh(1, u["end_s"] - u["start_s"], left=u["start_s"], color=color, alpha=0.6, height=0.5)
            ax.text((u["start_s"] + u["end_s"]) / 2, 1, u["label"], ha="center", va="center", fontsize=7)
        for e in t["micro_events"]:
            color = "tab:blue" if e["emotional"] else "lightgray"
            ax.barh(0, e["offset_s"] - e["onset_s"], left=e["onset_s"], color=color, height=0.5)
            if e["emotional"]:
                ax.text(e["peak_s"], -0.45, e["kind"].replace("_", " "), ha="center", fontsize=6)
        ax.set_xlim(0, t["duration_s"])
        ax.set_ylim(-0.8, 1.5)
        ax.set_yticks([0, 1], ["face", "speech"])
        ax.set_xlabel("seconds", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.set_title(f"{t['emotion']} - emotion in: {', '.join(k for k, v in t['channels'].items() if v)}",
                     fontsize=8)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
