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
import time
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


def _not_implemented(issue: int):
    def run(args: argparse.Namespace) -> int:
        print(f"microemo {args.command}: not implemented yet (tracked in issue #{issue}); nothing was done",
              file=sys.stderr)
        return 2

    return run


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


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.run import PreprocessConfig, preprocess
    from pipeline.run import format_summary as format_store_summary
    from pipeline.synth.corpus import SynthConfig, generate_corpus
    from pipeline.synth.preview import contact_sheet, format_summary

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/2] synth: {args.videos} talking-face clips -> {out / 'corpus'}", file=sys.stderr)
    cfg = SynthConfig(out=str(out / "corpus"), videos=args.videos, seed=args.seed)
    save_config(cfg, out / "corpus" / "config.yaml")
    summary = generate_corpus(cfg, progress=True)
    sheet = contact_sheet(out / "corpus", out / "corpus_preview.png")
    print("\n== synthetic corpus ==")
    print(format_summary(summary))
    if sheet:
        print(f"\nmicro-expression preview: {sheet}")
    print(f"manifest: {out / 'corpus' / 'manifest.jsonl'}   ground truth: {out / 'corpus' / 'truth.jsonl'}")

    print(f"\n[2/2] preprocess: feature store -> {out / 'features'}", file=sys.stderr)
    pcfg = PreprocessConfig(manifest=str(out / "corpus" / "manifest.jsonl"), out=str(out / "features"))
    save_config(pcfg, out / "features_config.yaml")
    store_summary = preprocess(pcfg, progress=True)
    print("\n== feature store ==")
    print(format_store_summary(store_summary))
    print(f"tables: {out / 'features'}/{{videos,frames,utterances,audio,labels}}/*.parquet")

    print("\nnot yet in the demo (open issues): training on the demo corpus (#5), evaluate/infer (#6)")
    print(f"demo finished in {time.perf_counter() - t0:.1f} s")
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
                   "(default: start a local Ray in-process)")
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
    p.add_argument("--address", metavar="RAY", help="Ray cluster for --launcher ray (default: local Ray)")
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a model on a feature-store split", formatter_class=_formatter,
                       description="EMER metrics (open-vocabulary label overlap, explanation similarity, "
                                   "per-utterance accuracy) with plots, written to REPORT_DIR.")
    p.add_argument("--model", required=True, metavar="RUN")
    p.add_argument("--features", required=True, metavar="DEST")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--out", required=True, metavar="REPORT_DIR")
    _add_config_args(p)
    p.set_defaults(func=_not_implemented(6))

    p = sub.add_parser("infer", help="explain the emotions in one video (JSON to stdout)", formatter_class=_formatter,
                       description="Runs the whole chain on one video on this machine; no cluster needed.")
    p.add_argument("video", metavar="VIDEO")
    p.add_argument("--model", required=True, metavar="RUN")
    _add_config_args(p)
    p.set_defaults(func=_not_implemented(6))

    p = sub.add_parser("retrain", help="scheduled fine-tune, evaluate and promote", formatter_class=_formatter,
                       description="Finds feature partitions newer than the promoted model, fine-tunes from it, "
                                   "evaluates on a fixed held-out set and promotes only if not worse.")
    p.add_argument("--config", required=True, metavar="F")
    p.set_defaults(func=_not_implemented(7), overrides=[])

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

    p = sub.add_parser("demo", help="the whole flow, small, with embedded models", formatter_class=_formatter,
                       description="Runs every stage that exists on a small synthetic corpus and shows the "
                                   "results. Needs no downloads.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--videos", type=int, default=12, metavar="N", help="clips in the demo corpus (default 12)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
