"""``microemo demo``: the whole system, small, with embedded models and no downloads.

    synth corpus -> preprocess (local Ray) -> stage 1 -> stage 2            (the full model)
                                           -> stage 2, video+audio off      (text-only baseline)
                                           -> (optional) ablations, e.g. face stream off
    -> evaluate each on the test split (EMER metrics, broken down by the corpus's channel mode)
    -> OUT/report.md: metrics side by side, deltas against the full model, loss curves, timelines

The synthetic corpus plants some clips' emotion only in the face (``mode=face_only``): the
text-only baseline cannot see it, so the full model's score on those clips is the evidence
that the visual branch carries information. ``--quick`` is a smoke run (tiny preset, a few
steps, every clip scored, train clips included): it shows the flow, not a result.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MODELS = {  # name -> (model overrides, stages)
    "full": ({}, (1, 2)),
    "text_only": ({"ablations": {"video": False, "audio": False}}, (2,)),
    "no_face": ({"ablations": {"local": False}}, (1, 2)),
    "no_utterance": ({"ablations": {"utterance": False}}, (1, 2)),
    "no_audio": ({"ablations": {"audio": False}}, (1, 2)),
}


@dataclass
class DemoConfig:
    out: str = "demo_out"
    videos: int = 200  # 120 training clips: with 60 the face path had too few to learn from
    seed: int = 0
    preset: str = "embedded"
    models: list = field(default_factory=lambda: ["full", "text_only"])  # + no_face, no_utterance, no_audio
    stage1_steps: int = 150
    stage2_steps: int = 60
    # stage 1 aligns on the Emotions line alone (prompt.target=labels): a step costs ~3 s instead of ~5.5 s
    # on 2 cores, and the whole loss is on which emotion the clip shows
    stage1_target: str = "labels"
    micro_batch_size: int = 2
    stage1_lr: float = 1e-3  # stage 1 trains freshly initialised modules only
    lr: float = 3e-4  # stage 2 (LoRA + the stage-1 modules)
    label_weight: float = 3.0  # prompt.label_weight for every model: the label lines' share of the loss
    # prompt.transcript_dropout for the models that see video or audio (not the text-only baseline, whose
    # only input it is): the share of training clips shown without their words
    transcript_dropout: float = 0.3
    # prompt.labels_first for stage 2 of every model: the Emotions line first, where stage 1 (labels
    # target) trained the model to name the emotion, then the explanation
    labels_first: bool = True
    split: str | None = "test"  # scored split (null: every clip)
    # a larger test split than the corpus default: the face-only clips in it are the comparison
    split_ratios: list = field(default_factory=lambda: [0.6, 0.1, 0.3])
    max_new_tokens: int = 160
    # more face-only clips than the default corpus: they are what the comparison is about
    mode_weights: dict = field(default_factory=lambda: {"all": 0.3, "face_only": 0.4, "voice_only": 0.15,
                                                        "text_only": 0.15})

    def __post_init__(self):
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or "full" not in self.models:
            raise ValueError(f"models must include full and come from {', '.join(MODELS)}; got {self.models}")
        if self.stage1_target not in ("answer", "labels"):
            raise ValueError(f"stage1_target must be answer or labels, got {self.stage1_target!r}")

    @classmethod
    def quick(cls, out: str, seed: int = 0) -> DemoConfig:
        return cls(out=out, videos=8, seed=seed, preset="tiny", models=["full", "text_only"], stage1_steps=3,
                   stage2_steps=3, split=None, max_new_tokens=24)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    import os

    from jobs.config import save_config
    from jobs.evaluate import EvalConfig, evaluate
    from jobs.predict import PredictConfig
    from jobs.train import OptimConfig, TrainConfig, launch
    from pipeline.run import PreprocessConfig, preprocess
    from pipeline.run import format_summary as format_store_summary
    from pipeline.synth.corpus import SynthConfig, generate_corpus
    from pipeline.synth.preview import contact_sheet, format_summary

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.yaml")
    timings: dict[str, float] = {}
    n_steps = 3 + sum(len(MODELS[m][1]) for m in cfg.models) + len(cfg.models)

    def step(k: int, what: str) -> float:
        _say(f"[{k}/{n_steps}] {what}")
        return time.perf_counter()

    t = step(1, f"synth: {cfg.videos} talking-face clips -> {out / 'corpus'}")
    scfg = SynthConfig(out=str(out / "corpus"), videos=cfg.videos, seed=cfg.seed, mode_weights=cfg.mode_weights,
                       split_ratios=tuple(cfg.split_ratios))
    save_config(scfg, out / "corpus" / "config.yaml")
    corpus = generate_corpus(scfg, progress=True)
    sheet = contact_sheet(out / "corpus", out / "corpus_preview.png")
    print("\n== synthetic corpus ==")
    print(format_summary(corpus))
    timings["synth"] = time.perf_counter() - t

    t = step(2, f"preprocess: feature store -> {out / 'features'}")
    pcfg = PreprocessConfig(manifest=str(out / "corpus" / "manifest.jsonl"), out=str(out / "features"))
    save_config(pcfg, out / "features_config.yaml")
    store = preprocess(pcfg, progress=True)
    print("\n== feature store ==")
    print(format_store_summary(store))
    timings["preprocess"] = time.perf_counter() - t

    k = 3
    runs: dict[str, Path] = {}
    for name in cfg.models:
        overrides, stages = MODELS[name]
        prev = None
        for stage in stages:
            run = out / "runs" / f"{name}_s{stage}"
            t = step(k, f"train {name} stage {stage} ({cfg.preset}) -> {run}")
            k += 1
            if run.exists() and not (run / "summary.json").is_file():
                shutil.rmtree(run)  # an interrupted earlier demo: start this run again
            if not (run / "summary.json").is_file():
                prompt = {"label_weight": cfg.label_weight} | ({"target": cfg.stage1_target} if stage == 1 else
                                                                {"labels_first": cfg.labels_first})
                sees = overrides.get("ablations", {})
                if sees.get("video", True) or sees.get("audio", True):
                    prompt["transcript_dropout"] = cfg.transcript_dropout
                model = {**overrides, "prompt": prompt}
                launch(TrainConfig(stage=stage, features=str(out / "features"), out=str(run),
                                   init=str(prev) if prev else None, preset=cfg.preset, model=model,
                                   max_steps=cfg.stage1_steps if stage == 1 else cfg.stage2_steps,
                                   micro_batch_size=cfg.micro_batch_size, save_every=10_000,
                                   split="train" if cfg.split else None, launcher="local", num_workers=1,
                                   optim=OptimConfig(lr=cfg.stage1_lr if stage == 1 else cfg.lr, warmup_steps=3)))
            timings[f"train {name} s{stage}"] = time.perf_counter() - t
            prev = run
        runs[name] = prev

    reports: dict[str, dict] = {}
    for name, run in runs.items():
        t = step(k, f"evaluate {name} on split {cfg.split or 'all'} -> {out / 'reports' / name}")
        k += 1
        reports[name] = evaluate(EvalConfig(model=str(run), features=str(out / "features"), split=cfg.split,
                                            out=str(out / "reports" / name), groups=str(out / "corpus" / "truth.jsonl"),
                                            predict=PredictConfig(launcher="local", max_new_tokens=cfg.max_new_tokens),
                                            by="mode", timelines=3 if name == "full" else 0), progress=True,
                                 ) | {"_run": str(run)}
        timings[f"evaluate {name}"] = time.perf_counter() - t
    t = step(k, "report")
    report = write_demo_report(cfg, out, reports, sheet, timings)
    timings["total"] = time.perf_counter() - t0
    summary = {"report": str(report), "timings": timings,
               "scores": {n: _scores(m) for n, m in reports.items()}}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _scores(m: dict) -> dict:
    face = ((m.get("by") or {}).get("mode") or {}).get("face_only") or {}
    return {"score": m["group"]["score"], "accuracy": m["group"]["accuracy"], "recall": m["group"]["recall"],
            "coarse_score": m["coarse"]["score"], "clue_timing": (m.get("clue_timing") or {}).get("rate"),
            "face_only_score": (face.get("group") or {}).get("score"), "face_only_n": face.get("n_clips", 0)}


def write_demo_report(cfg: DemoConfig, out: Path, reports: dict[str, dict], sheet, timings: dict) -> Path:
    from jobs.evaluate import metrics_table
    from jobs.plots import bar_chart

    scores = {n: _scores(m) for n, m in reports.items()}
    full = scores["full"]
    lines = ["# MicroEmo demo", "",
             f"{cfg.videos} synthetic clips, preset `{cfg.preset}`, stage 1 {cfg.stage1_steps} steps, stage 2 "
             f"{cfg.stage2_steps} steps (micro-batch {cfg.micro_batch_size}; stage-1 target `{cfg.stage1_target}`; "
             f"lr {cfg.stage1_lr:g} / {cfg.lr:g}; "
             f"label-line loss weight {cfg.label_weight:g}), scored on "
             + (f"the `{cfg.split}` split." if cfg.split else "every clip (train included: a smoke run, not a result)."),
             ""]
    if sheet:
        lines += ["![planted micro-expressions](corpus_preview.png)", ""]
    lines += ["## Scores", "", metrics_table({n: m for n, m in reports.items()}), "",
              "### Clips whose emotion is only in the face (`mode=face_only`)", "",
              metrics_table({n: ((m.get("by") or {}).get("mode") or {}).get("face_only") or {}
                             for n, m in reports.items()}), "",
              "### Against the full model", "", "| model | Δ score | Δ score, face-only clips | Δ clue timing |",
              "|---|---|---|---|"]
    for n, s in scores.items():
        if n == "full":
            continue

        def d(key):
            a, b = s.get(key), full.get(key)
            return f"{a - b:+.3f}" if a is not None and b is not None else "—"

        lines.append(f"| {n} | {d('score')} | {d('face_only_score')} | {d('clue_timing')} |")
    chart = bar_chart(out / "scores.png", {n: {"score": s["score"], "face-only score": s["face_only_score"] or 0.0}
                                           for n, s in scores.items()}, "EMER score (group level)")
    lines += ["", f"![scores]({chart.name})", "", "## Training", ""]
    for n, m in reports.items():
        run = Path(m["_run"])
        for stage_run in sorted(run.parent.glob(f"{n}_s*")):
            if (stage_run / "loss.png").is_file():
                lines += [f"**{stage_run.name}**", "", f"![{stage_run.name}](runs/{stage_run.name}/loss.png)", ""]
    tl = sorted((out / "reports" / "full" / "timelines").glob("*.png"))
    if tl:
        lines += ["## Timelines (full model)", ""] + [f"![{p.stem}](reports/full/timelines/{p.name})" for p in tl]
    lines += ["", "## Time", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
    lines += ["", "Per-model reports (predictions, per-clip scores): `reports/<model>/report.md`."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
