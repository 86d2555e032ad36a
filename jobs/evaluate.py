"""``microemo evaluate``: score a model on a split of a feature store, the way EMER does.

1. Predictions: batch prediction (``jobs.predict``) of every clip of the split, kept next to the
   features (``DEST/predictions/<model_id>-g<G>/``, resumable; in this process by default, on Ray
   with ``launcher=ray``).
2. References: the store's ``labels`` (clip labels, reference explanation, per-utterance labels)
   and ``utterances`` (transcript spans) tables.
3. Metrics: ``jobs.emer.score_clips`` (set-level accuracy/recall after synonym grouping at the
   lexicon's levels, per-utterance scores, clue timing; see docs/evaluation.md).
4. Report in REPORT_DIR: ``metrics.json``, ``predictions.jsonl``, ``report.md`` and
   ``timelines/<video_id>.png`` for a few clips.

``score_model`` is the same thing as a function returning the metrics (used by ``retrain``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from jobs.predict import PredictConfig, PredictionTable, predict_store, write_jsonl
from pipeline.store import FeatureStore

LEVELS = ("group", "fine", "coarse", "exact")


@dataclass
class EvalConfig:
    model: str = ""  # run directory, export/ or registry model
    features: str = ""
    split: str | None = "test"  # null = every labelled clip
    out: str = ""  # report directory
    video_ids: list | None = None  # evaluate only these clips (e.g. a fixed held-out list)
    lexicon: str | None = None  # emotion lexicon JSON (default: the packaged emotion wheel)
    threshold: float = 0.6  # sentence-embedding similarity for words outside the lexicon
    embedder: bool = True  # false: words outside the lexicon only match themselves
    tol_s: float = 0.5  # clue timing tolerance, seconds
    groups: str | None = None  # JSONL/CSV with video_id + tags (e.g. a synth truth.jsonl) for breakdowns
    by: str | None = None  # the tag to break scores down by (e.g. mode)
    timelines: int = 4  # clips to draw as timeline PNGs
    predict: PredictConfig = field(default_factory=lambda: PredictConfig(launcher="local"))
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.by and not self.groups:
            raise ValueError("by needs groups (a file with video_id and that tag)")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError("threshold must be in (0, 1]")


# ---------------------------------------------------------------------------------- references

def read_references(features: str, split: str | None, storage_options: dict | None = None,
                    video_ids: set[str] | None = None) -> dict[str, dict]:
    """video_id -> {video_id, labels, description, utterance_labels, utterances} for labelled usable clips."""
    from jobs.data import USABLE

    store = FeatureStore(features, storage_options)
    ok = {r["video_id"] for r in store.read_table("videos", columns=["video_id", "status"]).to_pylist()
          if r["status"] in USABLE}
    refs: dict[str, dict] = {}
    for r in store.read_table("labels").to_pylist():
        vid = r["video_id"]
        if vid in ok and (split is None or r["split"] == split) and (video_ids is None or vid in video_ids):
            refs[vid] = {"video_id": vid, "labels": list(r["labels"] or []), "description": r["description"],
                         "utterance_labels": list(r["utterance_labels"] or []), "utterances": []}
    if refs:
        utts = store.read_table("utterances", columns=["video_id", "utt_index", "start_s", "end_s", "text"])
        for u in sorted(utts.to_pylist(), key=lambda u: (u["video_id"], u["utt_index"])):
            if u["video_id"] in refs:
                refs[u["video_id"]]["utterances"].append(
                    {"start_s": u["start_s"], "end_s": u["end_s"], "text": u["text"]})
    return refs


def read_groups(path: str) -> dict[str, dict]:
    """video_id -> row of a JSONL or CSV file (e.g. the synth corpus's truth.jsonl)."""
    import csv

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"groups file {path}: no such file")
    if p.suffix == ".csv":
        with open(p, newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"groups file {path} line {i}: not JSON ({exc.msg})") from exc
    out = {str(r["video_id"]): r for r in rows if r.get("video_id") is not None}
    if not out:
        raise ValueError(f"groups file {path}: no rows with a video_id")
    return out


# ---------------------------------------------------------------------------------- evaluation

def _matcher(cfg: EvalConfig):
    from jobs.emer import LabelMatcher, Lexicon

    return LabelMatcher(Lexicon.load(cfg.lexicon), embedder="default" if cfg.embedder else None,
                        threshold=cfg.threshold)


def evaluate(cfg: EvalConfig, progress: bool = True, matcher=None) -> dict:
    """Predict (what is missing), score and write the report; returns the metrics dict."""
    from jobs.emer import score_clips

    t0 = time.perf_counter()
    ids = set(cfg.video_ids) if cfg.video_ids else None
    refs = read_references(cfg.features, cfg.split, cfg.storage_options, ids)
    if not refs:
        raise ValueError(f"{cfg.features}: no labelled clips" + (f" in split {cfg.split!r}" if cfg.split else ""))
    pcfg = replace(cfg.predict, model=cfg.model, features=cfg.features, split=cfg.split,
                   video_ids=sorted(refs), storage_options=cfg.storage_options)
    pred_summary = predict_store(pcfg, progress=progress)
    preds = {p["video_id"]: p for p in PredictionTable(pred_summary["predictions"], cfg.storage_options).read()
             if p["video_id"] in refs}
    groups = read_groups(cfg.groups) if cfg.groups else {}
    references = []
    for vid, r in sorted(refs.items()):
        if cfg.by:
            r = r | {cfg.by: str(groups.get(vid, {}).get(cfg.by, "unknown"))}
        references.append(r)
    predictions = [preds[vid] for vid in sorted(refs) if vid in preds]  # absent ones count in n_missing
    metrics = score_clips(predictions, references, matcher or _matcher(cfg), by=cfg.by, tol_s=cfg.tol_s)
    metrics.update(model=str(cfg.model), model_id=pred_summary["model_id"], features=cfg.features, split=cfg.split,
                   predictions_table=pred_summary["predictions"], seconds=time.perf_counter() - t0,
                   score=metrics["group"]["score"] if "group" in metrics else metrics.get("score"))
    if cfg.out:
        write_report(cfg, metrics, predictions, references)
    return metrics


def score_model(model_dir: str, features: str, split: str | None = None, video_ids=None,
                storage_options: dict | None = None, **opts) -> dict:
    """Metrics of a model on a held-out set (no report files); ``result["score"]`` is the headline
    (group-level mean of accuracy and recall, higher is better). ``opts``: EvalConfig fields, nested
    ones as dicts (``predict={"out": DIR}`` keeps the predictions out of a read-only store)."""
    from jobs.config import from_dict

    # from_dict: nested options (e.g. {"predict": {"out": DIR}} from a retrain config) become dataclasses
    cfg = from_dict(EvalConfig, {"model": model_dir, "features": features, "split": split, "out": "",
                                 "video_ids": list(video_ids) if video_ids else None,
                                 "storage_options": storage_options or {}, **opts})
    return evaluate(cfg, progress=False)


# ---------------------------------------------------------------------------------- report

def metrics_table(rows: dict[str, dict]) -> str:
    """Markdown: one row per named metrics dict (a model, an ablation, a group)."""
    head = "| | n | accuracy | recall | score | fine score | coarse score | exact score | utt. score | clue timing |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in rows.items():
        g = m.get("group", {})
        utt = m.get("utterance", {})
        clue = m.get("clue_timing", {})
        lines.append(
            f"| {name} | {m.get('n_clips', 0)} | {g.get('accuracy', 0):.3f} | {g.get('recall', 0):.3f} | "
            f"{g.get('score', 0):.3f} | {m.get('fine', {}).get('score', 0):.3f} | "
            f"{m.get('coarse', {}).get('score', 0):.3f} | {m.get('exact', {}).get('score', 0):.3f} | "
            + (f"{utt.get('score', 0):.3f} ({utt.get('n', 0)})" if utt.get("n") else "—") + " | "
            + (f"{clue.get('rate', 0):.2f} ({clue.get('hits', 0)}/{clue.get('total', 0)})" if clue.get("total")
               else "—") + " |")
    return "\n".join(lines)


def draw_timelines(out_dir: Path, features: str, predictions: list[dict], references: list[dict], n: int,
                   storage_options: dict | None = None) -> list[Path]:
    """Timeline PNGs for up to ``n`` clips (those with reference clue times first)."""
    from jobs.data import iter_samples
    from jobs.emer import clue_times
    from jobs.plots import timeline
    from pipeline.dynamics import micro_events

    if n <= 0:
        return []
    by_id = {p["video_id"]: p for p in predictions}
    ranked = sorted(references, key=lambda r: (not clue_times(r.get("description") or "", r["utterances"]),
                                               r["video_id"]))
    chosen = {r["video_id"]: r for r in ranked[:n]}
    out = []
    for s in iter_samples(features, video_ids=set(chosen), storage_options=storage_options):
        ref, pred = chosen[s["video_id"]], by_id.get(s["video_id"], {})
        out.append(timeline(
            out_dir / f"{s['video_id']}.png", video_id=s["video_id"], duration_s=s["duration_s"],
            utterances=s["utterances"], prediction=pred, reference=ref, pts_s=s["frame_pts"],
            energy=s["motion_energy"], events_s=micro_events(s["frame_pts"], s["motion_energy"],
                                                             offsets_s=s["motion_peak_offset_s"]),
            ref_clues=clue_times(ref.get("description") or "", ref["utterances"]),
            pred_clues=clue_times(pred.get("explanation") or "")))
    return sorted(out)


def write_report(cfg: EvalConfig, metrics: dict, predictions: list[dict], references: list[dict]) -> Path:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    write_jsonl(predictions, out / "predictions.jsonl")
    pngs = draw_timelines(out / "timelines", cfg.features, predictions, references, cfg.timelines,
                          cfg.storage_options)
    rows = {"all clips": metrics} | {f"{cfg.by}={k}": v for k, v in sorted(((metrics.get("by") or {}).get(cfg.by) or {}).items())}
    refs = {r["video_id"]: r for r in references}
    lines = [f"# Evaluation: {cfg.model}", "",
             f"Split `{cfg.split}` of `{cfg.features}`: {metrics.get('n_clips', 0)} clips scored "
             f"({metrics.get('n_skipped', 0)} without reference labels skipped); model id `{metrics['model_id']}`; "
             f"{100 * ((metrics.get('well_formed') or {}).get('rate') or 0):.0f}% of answers well formed; "
             f"{metrics.get('n_missing', 0)} clips without a prediction.", "",
             metrics_table(rows), "",
             "accuracy = |G∩P|/|P|, recall = |G∩P|/|G| per clip after synonym grouping (docs/evaluation.md), "
             "averaged; score = their mean.", ""]
    if pngs:
        lines += ["## Timelines", ""] + [f"![{p.stem}](timelines/{p.name})" for p in pngs] + [""]
    lines += ["## Examples", ""]
    for p in predictions[:6]:
        r = refs.get(p["video_id"], {})
        lines += [f"**{p['video_id']}** — predicted: {', '.join(p.get('labels') or []) or '—'}; "
                  f"reference: {', '.join(r.get('labels') or [])}", "",
                  f"> {(p.get('explanation') or p.get('text') or '').strip()[:600] or '(empty answer)'}", ""]
    (out / "report.md").write_text("\n".join(lines))
    return out / "report.md"
