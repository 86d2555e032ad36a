"""Per-utterance emotion timelines (PNG): what the model said, when, against what the face did.

    ┌ labels ─────────────────────────────────────────────────────────────────┐
    │ clip: predicted labels  |  reference labels                            │
    │ utterance bars (transcript times) with predicted / reference labels    │
    ├ face ───────────────────────────────────────────────────────────────────┤
    │ facial motion energy per sampled frame, estimated micro-events (▲),    │
    │ reference clue spans (green), times named by the explanation (orange)  │
    └─────────────────────────────────────────────────────── time (s) ───────┘
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def _save(fig, out_png: str | Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def _short(labels, n: int = 3) -> str:
    labels = list(labels or [])
    return ", ".join(labels[:n]) + (" …" if len(labels) > n else "") if labels else "—"


def timeline(out_png: str | Path, *, video_id: str, duration_s: float, utterances: list[dict],
             prediction: dict | None, reference: dict | None = None, pts_s=None, energy=None,
             events_s: list[float] | None = None, ref_clues: list[tuple[float, float]] | None = None,
             pred_clues: list[tuple[float, float]] | None = None) -> Path:
    """Write the timeline of one clip; returns the PNG path.

    utterances: transcript spans {start_s, end_s, text}; prediction: an answer record
    (``jobs.predict.answer_record``: labels, utterances with index/start_s/end_s/labels,
    explanation); reference: {labels, utterance_labels}; pts_s/energy: motion energy per frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    prediction = prediction or {}
    reference = reference or {}
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(10, 4.6), sharex=True, gridspec_kw={"height_ratios": [1.2, 1]})
    end = max([duration_s] + [float(u["end_s"]) for u in utterances] + [0.1])

    # -- utterances: transcript bars, predicted labels above, reference labels below
    pred_utts = {int(u["index"]): u for u in prediction.get("utterances") or []}
    ref_utts = list(reference.get("utterance_labels") or [])
    for i, u in enumerate(sorted(utterances, key=lambda u: float(u["start_s"])), 1):
        s, e = float(u["start_s"]), float(u["end_s"])
        ax.barh(0.5, e - s, left=s, height=0.34, color="#d9e6f2", edgecolor="#4a78a8")
        text = textwrap.shorten(str(u.get("text") or ""), width=max(12, int(14 * (e - s))), placeholder="…")
        ax.text((s + e) / 2, 0.5, text, ha="center", va="center", fontsize=7)
        p = pred_utts.get(i)
        ax.text((s + e) / 2, 0.9, _short(p["labels"] if p else None), ha="center", va="center", fontsize=8,
                color="#c05a00", fontweight="bold")
        best = max(ref_utts, key=lambda r: min(e, float(r["end_s"])) - max(s, float(r["start_s"])), default=None)
        if best is not None and min(e, float(best["end_s"])) > max(s, float(best["start_s"])):
            ax.text((s + e) / 2, 0.12, _short(best["labels"]), ha="center", va="center", fontsize=8, color="#2e7d32")
    ax.set_ylim(0, 1.05)
    ax.set_yticks([0.9, 0.5, 0.12], ["predicted", "utterance", "reference"], fontsize=8)
    ax.set_title(f"{video_id}   clip: predicted [{_short(prediction.get('labels'), 4)}]   "
                 f"reference [{_short(reference.get('labels'), 4)}]", fontsize=9)

    # -- face: motion energy, estimated micro-events, reference clues, times the explanation names
    for s, e in ref_clues or []:
        bx.axvspan(s, max(e, s + 0.05), color="#2e7d32", alpha=0.25, lw=0)
    for s, e in pred_clues or []:
        bx.axvspan(s, max(e, s + 0.05), ymin=0.0, ymax=0.15, color="#c05a00", alpha=0.7, lw=0)
    if pts_s is not None and energy is not None and len(pts_s):
        bx.plot(np.asarray(pts_s), np.asarray(energy), color="#4a78a8", lw=1.2, marker=".", ms=3)
        top = float(np.max(energy)) if len(energy) else 1.0
        for t in events_s or []:
            bx.plot([t], [top * 1.05], marker="v", color="#8e24aa", ms=7)
    bx.set_ylabel("face motion", fontsize=8)
    bx.set_xlabel("time (s)")
    bx.set_xlim(0, end)
    handles = [matplotlib.patches.Patch(color="#2e7d32", alpha=0.25, label="reference clue"),
               matplotlib.patches.Patch(color="#c05a00", alpha=0.7, label="time named in explanation"),
               matplotlib.lines.Line2D([], [], marker="v", ls="", color="#8e24aa", label="estimated micro-event")]
    bx.legend(handles=handles, fontsize=7, loc="upper right", ncol=3, frameon=False)
    return _save(fig, out_png)


def bar_chart(out_png: str | Path, rows: dict[str, dict[str, float]], title: str) -> Path:
    """Grouped bars: rows = {model name: {metric: value}} (e.g. full model vs ablations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(rows)
    metrics = list(dict.fromkeys(m for r in rows.values() for m in r))  # first-seen order
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) * max(1, len(metrics)) / 2), 3.2))
    width = 0.8 / max(1, len(metrics))
    x = np.arange(len(names))
    for j, m in enumerate(metrics):
        vals = [rows[n].get(m, np.nan) for n in names]
        bars = ax.bar(x + j * width - 0.4 + width / 2, vals, width, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_png)
