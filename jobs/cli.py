"""``microemo``: one command line for the whole system.

Every command takes ``--help``. Commands that run with a configuration also take
``--config FILE.yaml`` and trailing ``key=value`` overrides, print the resolved
configuration when they start and save it beside their outputs.

Exit codes: 0 success; 1 failure; 2 bad usage or bad input (one line naming the
offending file, row or field).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

from jobs.config import ConfigError, dump_config, load_config, save_config

EXAMPLES = """\
commands, in the order a corpus flows through them:
  synth       render a synthetic talking-face corpus with ground truth
  import      turn a public corpus's annotations into a manifest
  preprocess  videos -> Parquet feature store (Ray)
  train       stage 1 (alignment) or stage 2 (LoRA instruction tuning), DeepSpeed
  evaluate    score a trained model on a split of a feature store
  infer       explain the emotions in one video (JSON to stdout)
  retrain     the scheduled fine-tune / evaluate / promote step
  demo        all of the above, small, on the embedded models

examples:
  microemo synth --out corpus --videos 200 --seed 0
  microemo synth --out corpus --config synth.yaml width=480 height=360
  microemo demo --out demo_out

exit codes: 0 success, 1 failure, 2 bad usage or bad input
"""


class UsageError(ValueError):
    """Bad usage or input: reported in one line, exit code 2."""


# ---------------------------------------------------------------------------- helpers

def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML file with settings (see the resolved config printed at start)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override one setting, dotted for nested ones (e.g. width=480, split_ratios=[0.8,0.1,0.1])")


def _resolve(cls, args: argparse.Namespace, flags: dict):
    """Config file, then key=value overrides, then explicit flags (flags win)."""
    cfg = load_config(cls, args.config, list(args.overrides or []))
    given = {k: v for k, v in flags.items() if v is not None}
    if given:  # typed already by argparse; replace() re-runs the dataclass's validation
        try:
            cfg = dataclasses.replace(cfg, **given)
        except (TypeError, ValueError) as exc:
            raise ConfigError(str(exc)) from exc
    print(f"# microemo {args.command}: resolved config\n{dump_config(cfg)}", file=sys.stderr, end="")
    return cfg


# ---------------------------------------------------------------------------- commands

def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.synth.corpus import SynthConfig, generate_corpus
    from pipeline.synth.preview import format_summary

    cfg = _resolve(SynthConfig, args, {"out": args.out, "videos": args.videos, "seed": args.seed,
                                       "workers": args.workers})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    summary = generate_corpus(cfg, progress=not args.quiet)
    print(format_summary(summary))
    print(f"\nwrote {out / 'manifest.jsonl'} ({summary['generated']} clips rendered, {summary['reused']} reused) "
          f"in {summary['seconds']:.1f} s")
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from pipeline.manifest import ManifestError
    from pipeline.run import PreprocessConfig, format_summary, preprocess

    cfg = _resolve(PreprocessConfig, args, {"manifest": args.manifest, "out": args.out, "address": args.address,
                                            "workers": args.workers, "overwrite": args.overwrite})
    try:
        summary = preprocess(cfg, progress=not args.quiet)
    except ManifestError as exc:
        raise UsageError(str(exc)) from exc
    print(format_summary(summary))
    if summary["error_rate_exceeded"]:
        print(f"microemo preprocess: {summary['failed']} of {summary['processed']} videos failed, over "
              f"max_error_rate={cfg.max_error_rate}", file=sys.stderr)
        return 1
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from pipeline.importers.common import ImportError_, write_outputs

    out = Path(args.out)
    try:
        if args.format == "meld":
            from pipeline.importers.meld import import_meld

            joined = args.joined_dir or str(out.parent / "meld_dialogues")
            report = import_meld(args.annotations, args.videos, args.mode, args.split, joined)
        elif args.format == "emer":
            from pipeline.importers.labels import import_emer

            report = import_emer(args.annotations, args.videos, args.labels, args.split)
        elif args.format == "mer":
            from pipeline.importers.labels import import_mer

            report = import_mer(args.annotations, args.videos, args.split)
        else:
            from pipeline.importers.generic import import_generic, parse_mapping

            report = import_generic(args.annotations, args.videos, parse_mapping(args.map))
    except ImportError_ as exc:
        raise UsageError(str(exc)) from exc
    summary = write_outputs(report, str(out))
    print(f"{args.format}: {summary['rows']} manifest rows -> {out}; {summary['dropped']} dropped "
          f"(listed in {summary['dropped_file']}); {len(summary['warnings'])} warnings")
    for d in report.dropped[:10]:
        print(f"  dropped line {d['line']} ({d['id']}): {d['reason']}")
    if len(report.dropped) > 10:
        print(f"  ... and {len(report.dropped) - 10} more")
    for w in report.warnings[:5]:
        print(f"  warning line {w['line']} ({w['id']}): {w['message']}")
    if not report.rows:
        print(f"microemo import: no usable rows in {args.annotations}", file=sys.stderr)
        return 1
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from jobs.train import TrainConfig, launch

    cfg = _resolve(TrainConfig, args, {"stage": args.stage, "features": args.features, "out": args.out,
                                       "init": args.init, "resume": args.resume, "launcher": args.launcher,
                                       "num_workers": args.num_workers, "use_gpu": args.use_gpu,
                                       "address": args.address})
    if cfg.stage == 2 and not cfg.init and not cfg.resume:
        print("microemo train: stage 2 without --init starts from randomly initialised stage-1 modules",
              file=sys.stderr)
    try:
        summary = launch(cfg)
    except FileExistsError as exc:
        raise UsageError(str(exc)) from exc
    print(f"stage {cfg.stage}: {summary.get('step')} steps, final loss {summary.get('loss', float('nan')):.4f}, "
          f"{summary.get('samples_per_s', 0):.2f} samples/s, {100 * summary.get('data_wait_frac', 0):.1f}% of step "
          f"time waiting for data -> {cfg.out}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    import importlib.util

    from jobs.registry import Registry
    from jobs.retrain import RetrainConfig, RetrainInputError, format_result, retrain

    cfg = _resolve(RetrainConfig, args, {})
    if args.status:
        import json

        reg = Registry(cfg.registry, cfg.registry_options)
        print(json.dumps({"current": reg.current(), "history": reg.history()[-args.status:]}, indent=1))
        return 0
    if args.rollback:
        from jobs.registry import LockHeld
        from jobs.retrain import rollback

        try:
            done = rollback(cfg, args.rollback)
        except (RetrainInputError, ValueError) as exc:
            raise UsageError(str(exc)) from exc
        except LockHeld as exc:
            print(f"retrain: another run holds the registry lock ({exc}); not rolled back", file=sys.stderr)
            return 1
        print(f"retrain: {cfg.registry} now points at {done['model_id']} (was {done['from']})")
        return 0
    if cfg.metric == "emer" and importlib.util.find_spec("jobs.evaluate") is None:
        raise UsageError("metric: emer needs jobs.evaluate, which is not installed; set metric=heldout_loss")
    try:
        result = retrain(cfg, log=lambda line: print(line, file=sys.stderr, flush=True))
    except RetrainInputError as exc:
        raise UsageError(str(exc)) from exc
    print(format_result(cfg, result))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from jobs.predict import PredictConfig, predict_store

    cfg = _resolve(PredictConfig, args, {"model": args.model, "features": args.features, "split": args.split,
                                         "out": args.out, "launcher": args.launcher, "address": args.address,
                                         "workers": args.workers})
    if args.all_splits:
        cfg = dataclasses.replace(cfg, split=None)
    try:
        s = predict_store(cfg, progress=not args.quiet)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    print(f"predictions of model {s['model_id']}: {s['predicted']} new, {s['skipped']} already there, "
          f"{s['videos']} in all -> {s['predictions']} ({s['seconds']:.1f} s)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from jobs.evaluate import EvalConfig, evaluate, metrics_table

    cfg = _resolve(EvalConfig, args, {"model": args.model, "features": args.features, "split": args.split,
                                      "out": args.out, "lexicon": args.lexicon, "groups": args.groups, "by": args.by})
    if args.launcher:
        cfg = dataclasses.replace(cfg, predict=dataclasses.replace(cfg.predict, launcher=args.launcher))
    from jobs.predict import resolve_model_dir

    try:
        resolve_model_dir(cfg.model)  # before anything is written
        save_config(cfg, Path(cfg.out) / "config.yaml")
        m = evaluate(cfg, progress=not args.quiet)
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from exc
    rows = {"all clips": m} | {f"{cfg.by}={k}": v for k, v in sorted(((m.get("by") or {}).get(cfg.by) or {}).items())}
    print(metrics_table(rows))
    print(f"\nreport: {Path(cfg.out) / 'report.md'}   metrics: {Path(cfg.out) / 'metrics.json'}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    import json

    from jobs.infer import InferConfig, InferInputError, infer_video, plot_result

    cfg = _resolve(InferConfig, args, {"device": args.device})
    try:
        result = infer_video(args.video, args.model, cfg, srt=args.srt)
    except (InferInputError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from exc
    if args.plot:
        print(f"timeline: {plot_result(result, args.plot)}", file=sys.stderr)
    result.pop("_sample", None)
    print(json.dumps(result, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from jobs.demo import DemoConfig, run_demo

    if args.quick and not args.config and not args.overrides:
        cfg = DemoConfig.quick(args.out, seed=args.seed or 0)
        if args.videos:
            cfg = dataclasses.replace(cfg, videos=args.videos)
        print(f"# microemo demo: resolved config\n{dump_config(cfg)}", file=sys.stderr, end="")
    else:
        cfg = _resolve(DemoConfig, args, {"out": args.out, "videos": args.videos, "seed": args.seed})
    summary = run_demo(cfg)
    print("\n== scores (group level; face-only clips in brackets) ==")
    for name, s in summary["scores"].items():
        face = f"{s['face_only_score']:.3f} (n={s['face_only_n']})" if s["face_only_score"] is not None else "—"
        print(f"  {name:<12} score {s['score']:.3f}  accuracy {s['accuracy']:.3f}  recall {s['recall']:.3f}  "
              f"[face-only {face}]")
    print(f"\nreport: {summary['report']}")
    print(f"demo finished in {summary['timings']['total']:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="microemo",
        description="MicroEmo: explainable, time-sensitive multimodal emotion recognition in video dialogues.",
        epilog=EXAMPLES, formatter_class=_formatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "synth", help="render a synthetic talking-face corpus with ground truth", formatter_class=_formatter,
        description="Render talking-face mp4 clips (H.264 + AAC, 25 fps, 3-10 s, 1-4 utterances) from face "
                    "photos shipped in installed packages, with espeak-ng speech, planted facial "
                    "micro-expressions (0.1-0.4 s) and exact ground truth. Deterministic per seed; "
                    "rerunning into the same --out reuses finished clips.",
        epilog="writes OUT/manifest.jsonl (for `microemo preprocess`), OUT/truth.jsonl (everything the\n"
               "generator planted: emotion, channels, utterance times, micro-event times and boxes),\n"
               "OUT/corpus.json (counts), OUT/config.yaml and OUT/videos/*.mp4|.srt\n\n"
               "examples:\n  microemo synth --out corpus --videos 200 --seed 0\n"
               "  microemo synth --out corpus --videos 50 mode_weights='{all: 1}' blinks_per_minute=0")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--videos", type=int, metavar="N", help="number of clips (default 20)")
    p.add_argument("--seed", type=int, metavar="S", help="random seed (default 0)")
    p.add_argument("--workers", type=int, metavar="W", help="worker processes (default: one per core)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "preprocess", help="videos -> Parquet feature store on Ray", formatter_class=_formatter,
        description="Decode every video of a manifest, find and track the main speaker's face, and write "
                    "frame, face, facial-dynamics, audio and utterance features to a Parquet feature store "
                    "(local or s3://). Streaming and resumable: rerunning skips committed videos, adds new "
                    "ones and redoes changed ones. A bad video never stops the run; it gets a row in "
                    "videos/ saying why.",
        epilog="tables: videos/ frames/ utterances/ audio/ labels/ and _lineage.json (docs/feature_store.md)\n"
               "exit code 1 when more than max_error_rate of the processed videos failed\n\n"
               "examples:\n  microemo preprocess --manifest corpus/manifest.jsonl --out features\n"
               "  microemo preprocess --manifest s3://corpus/manifest.jsonl --out s3://features/v3 --address auto \\\n"
               "      process.decode.sample_fps=4 process.faces.backend=insightface process.faces.model_dir=/models\n"
               "  microemo preprocess --manifest m.jsonl --out fs 'storage_options={client_kwargs: "
               "{endpoint_url: http://127.0.0.1:9000}}'")
    p.add_argument("--manifest", required=True, metavar="M", help="JSONL/CSV/Parquet manifest, local or s3://")
    p.add_argument("--out", required=True, metavar="DEST", help="feature store directory or s3:// prefix")
    p.add_argument("--address", metavar="RAY", help="existing Ray cluster, e.g. auto or ray://head:10001 "
                   "(default: $RAY_ADDRESS when set, as inside a Ray job; else a new local Ray in-process)")
    p.add_argument("--workers", type=int, metavar="N", help="Ray actors (default: one per CPU)")
    p.add_argument("--overwrite", action="store_true", default=None, help="delete the store's tables first")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_preprocess)

    p = sub.add_parser(
        "train", help="two-stage training (DeepSpeed ZeRO)", formatter_class=_formatter,
        description="Stage 1 aligns the visual/audio Q-Formers to a frozen LLM; stage 2 instruction-tunes "
                    "with LoRA, starting from stage 1's export (--init). DeepSpeed ZeRO-2 by default "
                    "(zero.stage=3, zero.offload_optimizer=true selectable); ranks started by Ray Train "
                    "(default), torchrun, or in this process (--launcher local).",
        epilog="writes RUN/config.yaml, checkpoints/, metrics.jsonl, tensorboard/, loss.png and export/\n"
               "(microemo.safetensors, adapter/ for PEFT, model_config.json)\n\n"
               "examples:\n"
               "  microemo train --stage 1 --features fs --out runs/s1 preset=tiny max_steps=200\n"
               "  microemo train --stage 2 --features fs --out runs/s2 --init runs/s1 zero.stage=3\n"
               "  microemo train --stage 1 --features s3://features/v3 --out /mnt/shared/s1 --address auto "
               "--num-workers 8 --use-gpu preset=paper")
    p.add_argument("--stage", required=True, type=int, choices=(1, 2), help="1 = alignment, 2 = instruction tuning")
    p.add_argument("--features", required=True, metavar="DEST", help="feature store written by preprocess")
    p.add_argument("--out", required=True, metavar="RUN", help="run directory (checkpoints, metrics, export)")
    p.add_argument("--init", metavar="RUN1", help="stage-1 run to start stage 2 from")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the latest checkpoint in --out")
    p.add_argument("--launcher", choices=("ray", "torchrun", "local"), help="how ranks start (default ray)")
    p.add_argument("--num-workers", type=int, metavar="N", help="ranks (default 2)")
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per rank, NCCL, bf16")
    p.add_argument("--address", metavar="RAY", help="Ray cluster for --launcher ray (default: $RAY_ADDRESS, else a new local Ray)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "evaluate", help="score a model on a feature-store split (EMER metrics)", formatter_class=_formatter,
        description="Predict every clip of a split (resumable; kept in DEST/predictions/<model_id>-g<G>/), then score "
                    "it the way EMER does: per clip, accuracy |G∩P|/|P| and recall |G∩P|/|G| after grouping "
                    "synonyms with an emotion lexicon (a packaged emotion wheel, or --lexicon) and sentence-"
                    "embedding similarity for words outside it; at the lexicon's fine and coarse levels; per "
                    "utterance where references have them; and a clue-timing score (the share of reference clue "
                    "times the explanation names). Writes a Markdown report with timelines.",
        epilog="writes REPORT_DIR/report.md, metrics.json, predictions.jsonl, timelines/*.png, config.yaml\n"
               "docs: docs/evaluation.md\n\n"
               "examples:\n  microemo evaluate --model runs/s2 --features fs --split test --out reports/s2\n"
               "  microemo evaluate --model runs/s2 --features fs --out r --groups corpus/truth.jsonl --by mode\n"
               "  microemo evaluate --model runs/s2 --features s3://features/v3 --out r --launcher ray "
               "predict.address=auto predict.workers=8 threshold=0.7")
    p.add_argument("--model", required=True, metavar="RUN", help="training run directory (or its export/)")
    p.add_argument("--features", required=True, metavar="DEST", help="feature store (local or s3://)")
    p.add_argument("--split", default=None, help="split to score (default test)")
    p.add_argument("--out", required=True, metavar="REPORT_DIR", help="where the report goes")
    p.add_argument("--lexicon", metavar="FILE", help="your own emotion lexicon JSON (docs/evaluation.md)")
    p.add_argument("--groups", metavar="FILE", help="JSONL/CSV with video_id and tags, for --by breakdowns")
    p.add_argument("--by", metavar="TAG", help="break scores down by this tag of --groups (e.g. mode)")
    p.add_argument("--launcher", choices=("local", "ray"), help="predict in this process (default) or on Ray")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "infer", help="explain the emotions in one video (JSON to stdout)", formatter_class=_formatter,
        description="Runs the whole chain on one video in this process (no cluster, no feature store): decode, "
                    "faces, dynamics, encoders, utterances (SRT if given, else speech detection + ASR), then the "
                    "model. Prints JSON: explanation, clip labels, per-utterance labels with times, estimated "
                    "micro-events and the times the explanation names.",
        epilog="exit code 2 when the video cannot be used (missing, corrupt, no video stream ...), with the reason\n\n"
               "examples:\n  microemo infer clip.mp4 --model runs/s2\n"
               "  microemo infer clip.mp4 --model runs/s2 --srt clip.srt --plot clip_timeline.png\n"
               "  microemo infer s3://bucket/clip.mp4 --model runs/s2 'storage_options={anon: false}'")
    p.add_argument("video", metavar="VIDEO", help="video file (local path or s3://)")
    p.add_argument("--model", required=True, metavar="RUN", help="training run directory (or its export/)")
    p.add_argument("--srt", metavar="FILE", help="subtitles with the utterances (default: detect speech + ASR)")
    p.add_argument("--plot", metavar="PNG", help="also write a timeline picture")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the model runs (default auto)")
    _add_config_args(p)
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser(
        "predict", help="batch prediction over a feature store (Ray)", formatter_class=_formatter,
        description="Answer every clip of a split with a trained model; Ray actors load the model once and "
                    "write Parquet parts to DEST/predictions/<model_id>-g<G>/. Resumable: a rerun predicts only the "
                    "clips without a committed prediction.",
        epilog="examples:\n  microemo predict --model runs/s2 --features fs --split test\n"
               "  microemo predict --model runs/s2 --features s3://features/v3 --all-splits --address auto "
               "--workers 8 gpus_per_worker=1")
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--features", required=True, metavar="DEST")
    p.add_argument("--split", default=None, help="split to predict (default test)")
    p.add_argument("--all-splits", action="store_true", help="every usable clip")
    p.add_argument("--out", metavar="DIR", help="prediction table (default DEST/predictions/<model_id>-g<G>[-n<N>])")
    p.add_argument("--launcher", choices=("ray", "local"), help="Ray actors (default) or this process")
    p.add_argument("--address", metavar="RAY", help="existing Ray cluster (default: $RAY_ADDRESS, else a new local Ray)")
    p.add_argument("--workers", type=int, metavar="N", help="actors (default: one per CPU)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _add_config_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "retrain", help="scheduled fine-tune, evaluate and promote", formatter_class=_formatter,
        description="The scheduled retraining step. Under the registry's lock: finds feature-store shards with "
                    "training videos that the promoted model was not trained on; if there are none, says so and "
                    "exits 0. Otherwise fine-tunes stage 2 from the promoted model (stage 1 + 2 from scratch for "
                    "the first model or with from_scratch=true), scores the candidate and the promoted model on a "
                    "fixed held-out set, and promotes the candidate only if candidate >= current - margin. "
                    "Every decision goes to the registry's history. Safe to rerun after a crash at any point.",
        epilog="config keys: features, registry, work_dir, storage_options, train.* (TrainConfig: preset, model,\n"
               "max_steps, micro_batch_size, optim.*, zero.*, launcher, num_workers, use_gpu, address),\n"
               "stage1_max_steps, from_scratch, heldout.split | heldout.video_ids, metric (emer | heldout_loss),\n"
               "score_opts, margin, lock_ttl_s, keep_checkpoints (docs/operations.md, Scheduled retraining)\n"
               "registry: current.json, models/<id>/, history.jsonl, attempts/<id>/, lock\n"
               "exit codes: 0 promoted, rejected, no new data or another run holds the lock; 1 failure;\n"
               "2 bad config (one line naming the key)\n\n"
               "examples:\n  microemo retrain --config /etc/microemo/retrain.yaml\n"
               "  microemo retrain --config retrain.yaml train.max_steps=50 margin=0.01\n"
               "  microemo retrain --config retrain.yaml --status 20      # pointer + last 20 decisions\n"
               "  microemo retrain --config retrain.yaml --rollback m20261124T030512Z-1a2b3c4d")
    p.add_argument("--config", required=True, metavar="F", help="YAML retraining policy (RetrainConfig)")
    p.add_argument("--status", type=int, nargs="?", const=20, default=None, metavar="N",
                   help="print the current pointer and the last N history entries (default 20), change nothing")
    p.add_argument("--rollback", metavar="MODEL_ID", help="point the registry back at an earlier promoted model")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override one setting, dotted for nested ones")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser(
        "import", help="public corpus annotations -> manifest", formatter_class=_formatter,
        description="Convert a published emotion corpus's annotation file into a MicroEmo manifest (JSONL). "
                    "Every row is validated; rows that cannot be used are listed with their line and reason in "
                    "MANIFEST.dropped.jsonl, and MANIFEST.report.json records the source file, its sha256, "
                    "counts and warnings. Formats: meld (CSV with Dialogue_ID, Utterance_ID, StartTime, ...), "
                    "emer (name,chinese,english + optional --labels), mer (name,openset or name,discrete), "
                    "generic (any CSV/JSONL with --map).",
        epilog="examples:\n"
               "  microemo import meld --annotations train_sent_emo.csv --videos train_splits --out meld_train.jsonl "
               "--split train\n"
               "  microemo import meld --mode dialogue --annotations dev_sent_emo.csv --videos dev_splits_complete "
               "--out meld_dev_dialogues.jsonl --split val\n"
               "  microemo import emer --annotations emer.csv --labels ov-labels.csv --videos video --out emer.jsonl\n"
               "  microemo import mer --annotations check-openset.csv --videos s3://corpora/mer2024 --out mer.jsonl\n"
               "  microemo import generic --annotations clips.csv --videos clips/ --out m.jsonl "
               "--map video_id=clip,labels=emotions,description=why\n\n"
               "docs: docs/datasets/*.md")
    p.add_argument("format", metavar="FORMAT", choices=("meld", "emer", "mer", "generic"),
                   help="meld | emer | mer | generic")
    p.add_argument("--annotations", required=True, metavar="FILE", help="annotation file (local or s3://)")
    p.add_argument("--videos", required=True, metavar="DIR_OR_URI", help="folder or s3:// prefix holding the clips")
    p.add_argument("--out", required=True, metavar="MANIFEST", help="manifest to write (.jsonl)")
    p.add_argument("--split", metavar="NAME", help="split to record on every row (train, val, test)")
    p.add_argument("--mode", default="utterance", choices=("utterance", "dialogue"),
                   help="meld: one row per utterance clip, or one joined video per dialogue")
    p.add_argument("--joined-dir", metavar="DIR", help="meld dialogue mode: where joined videos go "
                   "(default: MANIFEST's folder/meld_dialogues)")
    p.add_argument("--labels", metavar="FILE", help="emer: open-vocabulary label file (name,openset)")
    p.add_argument("--map", action="append", default=[], metavar="FIELD=COLUMN",
                   help="generic: source column for a manifest field (video_id, uri, labels, description, "
                        "split, utterances); repeat or comma-separate")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser(
        "demo", help="the whole flow, small, with embedded models", formatter_class=_formatter,
        description="Synthetic corpus -> feature store (local Ray) -> stage 1 -> stage 2 -> evaluation of the full "
                    "model and a text-only baseline (and ablations: models=[...]) on the test split -> OUT/report.md (scores side "
                    "by side, face-only clips separately, loss curves, timelines). Needs no downloads. About 30 "
                    "minutes on 2 CPU cores; --quick is a smoke run of the same flow (tiny model, minutes).",
        epilog="examples:\n  microemo demo --out demo_out\n  microemo demo --out demo_quick --quick\n"
               "  microemo demo --out d models=[full,text_only,no_face,no_audio] stage1_steps=200 videos=120")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--videos", type=int, metavar="N", help="clips in the demo corpus (default 200; --quick 8)")
    p.add_argument("--seed", type=int, metavar="S", help="corpus seed (default 0)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny preset, few steps, every clip scored")
    _add_config_args(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse fills a trailing nargs="*" positional only before the options that follow the
    # first positional (``infer VIDEO --model R key=value``): take key=value leftovers here
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*(args.overrides or []), *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except (ConfigError, UsageError) as exc:
        print(f"microemo {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"microemo {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a one-line reason; the traceback with -v
        if args.verbose:
            raise
        print(f"microemo {args.command}: failed: {type(exc).__name__}: {exc} (rerun with -v for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
