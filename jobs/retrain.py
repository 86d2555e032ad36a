"""``microemo retrain --config F``: the scheduled retraining step (cron, KubeRay RayCronJob).

One run, under the registry lock (``jobs.registry``):

1. finish any earlier attempt that decided but crashed before its history record;
2. find the feature-store shards with training-split videos that the promoted model was not
   trained on (a shard is a committed partition of the store; see ``pipeline.store``);
3. none: print so, record one coalesced ``no_new_data`` history entry, exit 0;
4. otherwise fine-tune stage 2 from the promoted model's export (or stage 1 then stage 2 from
   scratch: the first model, or ``from_scratch: true``) on the store's whole training split;
5. score the candidate and the promoted model on the same fixed held-out set (the promoted
   model's score is reused from its pointer when the held-out fingerprint is unchanged);
6. promote when ``candidate >= current - margin``: copy to ``models/<id>/``, swap the pointer
   atomically, record the decision; otherwise record the rejection with both scores.

Crash safety: an attempt is named by a hash of (promoted model, new shards, settings), so a rerun
after a crash finds the same attempt: its training resumes from checkpoints (or is skipped when
its export is complete), a finished evaluation is reused, a written decision is carried out, and
every step of carrying it out is idempotent (see ``finish``). Test hook: the environment variable
``MICROEMO_RETRAIN_CRASH_AT=<point>`` SIGKILLs the process at that point (``CRASH_POINTS``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from jobs.registry import LockHeld, Registry, utcnow

METRICS = ("emer", "heldout_loss")
RESERVED_TRAIN_KEYS = ("stage", "features", "out", "init", "resume")  # retrain sets these itself
CRASH_POINTS = ("after_lock", "after_train", "after_eval", "after_decision", "after_copy", "after_pointer")
CRASH_ENV = "MICROEMO_RETRAIN_CRASH_AT"


class RetrainInputError(ValueError):
    """The store or registry cannot serve this config (exit 2); the message names the field."""


@dataclass
class HeldoutConfig:
    split: str | None = "test"  # the held-out split of the store's labels ...
    video_ids: list[str] = field(default_factory=list)  # ... or an explicit list (wins when given)


@dataclass
class RetrainConfig:
    features: str = ""  # feature store (local or s3://)
    registry: str = ""  # model registry (local or s3://)
    work_dir: str | None = None  # training runs; default REGISTRY/attempts/ (required for a remote registry)
    storage_options: dict = field(default_factory=dict)  # fsspec options for the store (and the registry)
    registry_storage_options: dict | None = None  # for the registry when they differ
    train: dict = field(default_factory=dict)  # TrainConfig fields: preset, model, max_steps, optim, zero, ...
    stage1_max_steps: int | None = None  # from scratch: stage-1 steps (default train.max_steps)
    from_scratch: bool = False  # stage 1 + 2 from random init instead of fine-tuning the promoted model
    heldout: HeldoutConfig = field(default_factory=HeldoutConfig)
    metric: str = "emer"  # emer (jobs.evaluate.score_model) | heldout_loss (-answer cross-entropy)
    score_opts: dict = field(default_factory=dict)  # keyword arguments of the scorer
    margin: float = 0.0  # promote when candidate >= current - margin (negative: demand an improvement)
    lock_ttl_s: float = 900.0  # a lock not renewed for this long is stale (the holder renews every ttl/4)
    keep_checkpoints: bool = False  # keep the attempt's checkpoints and model copies after its decision

    def __post_init__(self):
        for name in ("features", "registry"):
            if not getattr(self, name):
                raise ValueError(f"{name}: required")
        if self.metric not in METRICS:
            raise ValueError(f"metric: must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.lock_ttl_s > 0:
            raise ValueError("lock_ttl_s: must be > 0")
        if self.stage1_max_steps is not None and self.stage1_max_steps < 1:
            raise ValueError("stage1_max_steps: must be >= 1")
        if not math.isfinite(self.margin):
            raise ValueError("margin: must be a finite number")
        for key in RESERVED_TRAIN_KEYS:
            if key in self.train:
                raise ValueError(f"train.{key}: set by retrain itself; remove it from the config")
        tcfg = self.train_config(2, "unused")  # names a bad train.* key or value
        if tcfg.split is None:
            raise ValueError("train.split: retraining needs a training split (held-out videos must never train)")
        if not self.heldout.video_ids and not self.heldout.split:
            raise ValueError("heldout: give heldout.split or heldout.video_ids")
        if not self.heldout.video_ids and self.heldout.split == tcfg.split:
            raise ValueError(f"heldout.split: {self.heldout.split!r} is also the training split (train.split)")
        if self.work_dir is None and "://" in self.registry and not self.registry.startswith("file://"):
            raise ValueError("work_dir: required when the registry is remote (training runs need a local or "
                             "shared filesystem)")

    def train_config(self, stage: int, out: str, init: str | None = None, max_steps: int | None = None):
        """The TrainConfig of one stage: ``train`` plus what retrain decides (stage, data, run dir)."""
        from jobs.config import from_dict
        from jobs.train import TrainConfig

        data = {**self.train, "stage": stage, "features": self.features, "out": out, "init": init}
        data.setdefault("storage_options", self.storage_options)
        if max_steps is not None:
            data["max_steps"] = max_steps
        return from_dict(TrainConfig, data, prefix="train.")

    @property
    def registry_options(self) -> dict:
        return self.storage_options if self.registry_storage_options is None else self.registry_storage_options


# ---------------------------------------------------------------------------- small helpers

def _hash(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def settings_hash(cfg: RetrainConfig) -> str:
    """What decides an attempt's outcome (not where things live, nor credentials)."""
    return _hash({"features": cfg.features, "train": cfg.train, "stage1_max_steps": cfg.stage1_max_steps,
                  "from_scratch": cfg.from_scratch, "heldout": asdict(cfg.heldout), "metric": cfg.metric,
                  "score_opts": cfg.score_opts, "margin": cfg.margin})


def attempt_id(parent: str | None, new_shards: list[str], cfg: RetrainConfig) -> str:
    return "a" + _hash({"parent": parent, "new": sorted(new_shards), "settings": settings_hash(cfg)}, 15)


def crash_point(name: str) -> None:
    """Test hook: SIGKILL this process at ``name`` when MICROEMO_RETRAIN_CRASH_AT says so (a real crash:
    no finally blocks, no lock release, no flushing)."""
    if os.environ.get(CRASH_ENV) == name:
        print(f"retrain: test hook {CRASH_ENV}={name}: killing myself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # pragma: no cover - the signal arrives first


def _finite(x: Any) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------- the store

def training_shards(store, split: str, shards: list[str]) -> dict[str, list[str]]:
    """shard -> usable video ids of ``split`` in it, for the given shards (those without any are left out)."""
    from jobs.data import USABLE

    out: dict[str, list[str]] = {}
    for shard in shards:
        videos = store.read_table("videos", shards=[shard], columns=["video_id", "status"]).to_pylist()
        labels = store.read_table("labels", shards=[shard], columns=["video_id", "split"]).to_pylist()
        splits = {r["video_id"]: r["split"] for r in labels}
        ids = sorted(v["video_id"] for v in videos if v["status"] in USABLE and splits.get(v["video_id"]) == split)
        if ids:
            out[shard] = ids
    return out


def heldout_set(store, cfg: RetrainConfig, train_videos: set[str]) -> list[tuple[str, str]]:
    """Sorted (shard, video_id) of the held-out videos. Raises RetrainInputError when it is empty, names
    a video the store lacks, or overlaps the training split."""
    from jobs.data import video_index

    if cfg.heldout.video_ids:
        wanted = set(cfg.heldout.video_ids)
        found = [(s, v) for s, v in video_index(store) if v in wanted]
        missing = sorted(wanted - {v for _, v in found})
        if missing:
            raise RetrainInputError(f"heldout.video_ids: {missing[0]} is not a usable video of {cfg.features} "
                                    f"({len(missing)} missing)")
        overlap = sorted(wanted & train_videos)
        if overlap:
            raise RetrainInputError(f"heldout.video_ids: {overlap[0]} is in the training split "
                                    f"{cfg.train_config(2, 'x').split!r}: held-out videos must never train")
        return sorted(found)
    found = video_index(store, cfg.heldout.split)
    if not found:
        raise RetrainInputError(f"heldout.split: no usable {cfg.heldout.split!r} videos in {cfg.features}")
    return found


def heldout_fingerprint(cfg: RetrainConfig, heldout: list[tuple[str, str]]) -> str:
    """Scores are comparable when this matches: same scorer, options and videos (in the same shards:
    a re-processed video lands in a new shard)."""
    return _hash({"metric": cfg.metric, "score_opts": cfg.score_opts, "videos": heldout})


# ---------------------------------------------------------------------------- scoring

def heldout_loss(model_dir: str | Path, features: str, video_ids: list[str], storage_options: dict | None = None,
                 batch_size: int = 4, device: str = "cpu") -> dict:
    """Mean cross-entropy of the answer tokens (nats per token) of a saved model on the given videos;
    ``score`` is its negation (higher is better)."""
    import torch

    from jobs.data import iter_samples
    from jobs.predict import load_model

    model = load_model(model_dir, device)
    collate = model.collator(train=True)
    total, tokens, videos = 0.0, 0, 0
    batch: list[dict] = []

    def flush():
        nonlocal total, tokens, videos
        out = model(collate(batch).to(device))
        total += float(out.loss) * out.answer_tokens
        tokens += out.answer_tokens
        videos += len(batch)
        batch.clear()

    with torch.no_grad():
        for sample in iter_samples(features, video_ids=set(video_ids), storage_options=storage_options):
            batch.append(sample)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if tokens == 0:
        raise ValueError(f"{features}: none of the {len(video_ids)} held-out videos could be read")
    loss = total / tokens
    return {"score": -loss, "loss": loss, "answer_tokens": tokens, "videos": videos}


def score(model_dir: str | Path, cfg: RetrainConfig, video_ids: list[str]) -> dict:
    """The configured scorer's result for a saved model on the held-out videos (``score``: higher is better)."""
    if cfg.metric == "emer":
        from jobs.evaluate import score_model

        result = score_model(str(model_dir), cfg.features, split=None, video_ids=list(video_ids),
                             storage_options=cfg.storage_options, **cfg.score_opts)
    else:
        result = heldout_loss(model_dir, cfg.features, video_ids, cfg.storage_options, **cfg.score_opts)
    # per-clip details stay with the scorer's own outputs; NaN/inf -> None (JSON-safe, never promoted)
    result = _json_safe({k: v for k, v in result.items() if k != "clips"})
    result["score"] = _finite(result.get("score"))
    return result


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    try:  # numpy scalars and the like
        return _json_safe(obj.item())
    except AttributeError:
        return str(obj)


def decide(candidate: float | None, current: float | None, margin: float) -> tuple[str, str]:
    """(``promoted`` | ``rejected``, why)."""
    if candidate is None:
        return "rejected", "the candidate's score is not finite"
    if current is None:
        return "promoted", "no promoted model to compare with"
    if candidate >= current - margin:
        return "promoted", f"{candidate:.6g} >= {current:.6g} - {margin:g}"
    return "rejected", f"{candidate:.6g} < {current:.6g} - {margin:g}"


# ---------------------------------------------------------------------------- training

def _complete(run: Path, max_steps: int) -> dict | None:
    """The run's summary when it finished and exported (summary.json is written after the export)."""
    from model.weights import CONFIG_FILE, MODULES_FILE

    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    done = not summary.get("preempted") and summary.get("step", 0) >= max_steps
    if done and (run / "export" / MODULES_FILE).is_file() and (run / "export" / CONFIG_FILE).is_file():
        return summary
    return None


def run_stage(tcfg, log: Callable[[str], None]) -> dict:
    """Train one stage into ``tcfg.out``: skipped when already complete, resumed when it has checkpoints."""
    from jobs.train import latest_checkpoint, launch

    run = Path(tcfg.out)
    done = _complete(run, tcfg.max_steps)
    if done is not None:
        log(f"  stage {tcfg.stage}: already trained in {run} (step {done.get('step')}), reusing it")
        return {**done, "reused": True}
    resume = latest_checkpoint(run) is not None
    log(f"  stage {tcfg.stage}: {'resuming' if resume else 'training'} {tcfg.max_steps} steps "
        f"({tcfg.launcher} launcher) -> {run}")
    summary = launch(replace(tcfg, resume=resume))
    if summary.get("preempted") or _complete(run, tcfg.max_steps) is None:
        raise RuntimeError(f"stage {tcfg.stage} stopped at step {summary.get('step')} of {tcfg.max_steps} "
                           f"(preempted?); rerun retrain to resume it")
    return summary


def _copy_model(src: Path, dest: Path) -> None:
    """Copy a weights directory (complete or not at all: via a temporary sibling)."""
    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("card.json"))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


# ---------------------------------------------------------------------------- the run

class Retrain:
    """One ``microemo retrain`` run; ``run()`` returns a result dict (``outcome`` and details)."""

    def __init__(self, cfg: RetrainConfig, log: Callable[[str], None] = print):
        self.cfg, self.log = cfg, log
        self.reg = Registry(cfg.registry, cfg.registry_options)

    # -------------------------------------------------------------- paths
    def work(self, attempt: str) -> Path:
        if self.cfg.work_dir:
            return Path(self.cfg.work_dir).resolve() / attempt
        return Path(self.reg.path(self.reg.attempt_rel(attempt)))

    def _read(self, attempt: str, name: str) -> dict | None:
        return self.reg.read_json(self.reg.attempt_rel(attempt, name))

    def _write(self, attempt: str, name: str, obj: dict) -> None:
        self.reg.write_json(self.reg.attempt_rel(attempt, name), obj)

    # -------------------------------------------------------------- top level
    def run(self) -> dict:
        lock = self.reg.lock(self.cfg.lock_ttl_s, note="microemo retrain")
        try:
            broken = lock.acquire()
        except LockHeld as exc:
            return {"outcome": "locked", "owner": exc.owner, "message": str(exc)}
        self.lock = lock
        attempt = None
        try:
            for b in broken:
                self.reg.record({"id": f"lock-broken-{lock.token[:12]}", "decision": "lock_broken", **b})
                self.log(f"retrain: broke a stale lock of {b['previous_owner'].get('host')} pid "
                         f"{b['previous_owner'].get('pid')} ({b['reason']})")
            crash_point("after_lock")
            self.reconcile()
            result = self.step()
            attempt = result.get("attempt")
            return result
        except Exception as exc:
            attempt = attempt or getattr(self, "_attempt", None)
            try:  # best effort: the failure itself must surface even if recording it fails
                self.reg.record({"id": f"failed-{attempt or 'run'}-{lock.token[:12]}", "decision": "failed",
                                 "attempt": attempt, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            except Exception:
                pass
            raise
        finally:
            lock.release()

    def reconcile(self) -> None:
        """Carry out decisions that a crashed run wrote but did not finish (no history record yet)."""
        recorded = {r.get("id") for r in self.reg.history()}
        for attempt in self.reg.decided_attempts():
            if attempt not in recorded:
                self.log(f"retrain: finishing attempt {attempt}, decided by an earlier run that stopped")
                self.finish(attempt)

    def step(self) -> dict:
        cfg, reg = self.cfg, self.reg
        from pipeline.store import FeatureStore

        train_split = cfg.train_config(2, "x").split
        current = reg.current()
        store = FeatureStore(cfg.features, cfg.storage_options)
        listed = store.shards("videos")
        trained = set(current["trained_shards"]) if current else set()
        # only shards the promoted model has not seen are read: the no-new-data check stays cheap
        new = training_shards(store, train_split, [s for s in listed if s not in trained])
        cur_id = current["model_id"] if current else None
        eligible = sorted(set(new) | (trained & set(listed)))
        if not new:
            return self.no_new_data(current, eligible)

        attempt = attempt_id(cur_id, sorted(new), cfg)
        self._attempt = attempt
        decision = self._read(attempt, "decision.json")
        if decision is not None:  # decided earlier (and finished by reconcile): nothing new since
            return {"outcome": "already_decided", "attempt": attempt, "decision": decision,
                    "current": cur_id, "new_shards": sorted(new)}
        info = self._read(attempt, "attempt.json")
        fresh = info is None
        if fresh:  # the attempt's inputs, fixed once: a rerun continues with the same ones
            from jobs.config import redact, to_dict

            everything = {**training_shards(store, train_split, [x for x in eligible if x not in new]), **new}
            info = {"attempt": attempt, "model_id": f"m{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{attempt[1:9]}",
                    "parent": cur_id, "mode": "scratch" if cfg.from_scratch or current is None else "finetune",
                    "new_shards": sorted(new), "trained_shards": sorted(everything),
                    "train_videos": sorted(v for ids in everything.values() for v in ids),
                    "features": cfg.features, "settings": settings_hash(cfg), "started_at": utcnow(),
                    "config": redact(to_dict(cfg))}
        heldout = heldout_set(store, cfg, set(info["train_videos"]))  # bad held-out settings fail before training
        if fresh:
            self._write(attempt, "attempt.json", info)
        self.log(f"retrain: {len(new)} new training shard(s) since {cur_id or 'the empty registry'} "
                 f"({len(info['trained_shards'])} in all); attempt {attempt} ({info['mode']})")

        work = self.work(attempt)
        export, summaries = self.train(info, current, work)
        crash_point("after_train")
        evaluation = self.evaluate(attempt, current, export, heldout, work)
        crash_point("after_eval")
        verdict, why = decide(evaluation["candidate"]["score"], evaluation["current"]["score"], cfg.margin)
        decision = {"attempt": attempt, "decision": verdict, "reason": why, "model_id": info["model_id"],
                    "parent": cur_id, "candidate_score": evaluation["candidate"]["score"],
                    "current_score": evaluation["current"]["score"],
                    "current_score_source": evaluation["current"]["source"], "margin": cfg.margin,
                    "metric": cfg.metric, "heldout": evaluation["heldout"], "candidate_dir": str(export),
                    "train": summaries, "decided_at": utcnow()}
        self._write(attempt, "decision.json", decision)
        crash_point("after_decision")
        record = self.finish(attempt)
        return {"outcome": record["decision"], "attempt": attempt, "decision": decision, "record": record,
                "current": cur_id, "new_shards": sorted(new), "mode": info["mode"]}

    def no_new_data(self, current: dict | None, eligible: list[str]) -> dict:
        """One history entry per (promoted model, set of training shards): repeated checks update its
        count and time instead of adding lines."""
        cur_id = current["model_id"] if current else None
        rid = "nodata-" + _hash({"current": cur_id, "shards": eligible}, 12)
        previous = next((r for r in self.reg.history() if r.get("id") == rid), None)
        checks = (previous or {}).get("checks", 0) + 1
        self.reg.record({"id": rid, "decision": "no_new_data", "current": cur_id, "training_shards": len(eligible),
                         "checks": checks, "last_checked_at": utcnow()}, merge=True)
        return {"outcome": "no_new_data", "current": cur_id, "training_shards": len(eligible), "checks": checks}

    # -------------------------------------------------------------- pieces
    def parent_dir(self, current: dict, work: Path) -> Path:
        """A local directory with the promoted model's files."""
        return self.reg.fetch(current["model_id"], work / "parent")

    def train(self, info: dict, current: dict | None, work: Path) -> tuple[Path, dict]:
        """Train the candidate; returns its export directory and the stages' summaries."""
        from model.weights import MODULES_FILE

        cfg = self.cfg
        work.mkdir(parents=True, exist_ok=True)
        summaries = {}
        if info["mode"] == "scratch":
            s1 = cfg.train_config(1, str(work / "stage1"), max_steps=cfg.stage1_max_steps)
            summaries["stage1"] = run_stage(s1, self.log)
            init = work / "stage1"
        else:
            if current is None or current["model_id"] != info["parent"]:
                raise RuntimeError(f"attempt {info['attempt']} fine-tunes {info['parent']}, but the registry "
                                   f"now points at {current and current['model_id']}")
            # jobs.train reads INIT/export/: the promoted model's files become that export
            init = work / "init"
            if not (init / "export" / MODULES_FILE).is_file():
                init.mkdir(parents=True, exist_ok=True)
                _copy_model(self.parent_dir(current, work), init / "export")
        s2 = cfg.train_config(2, str(work / "stage2"), init=str(init))
        summaries["stage2"] = run_stage(s2, self.log)
        keep = ("step", "loss", "samples_per_s", "reused")
        return work / "stage2" / "export", {k: {x: v.get(x) for x in keep if x in v} for k, v in summaries.items()}

    def evaluate(self, attempt: str, current: dict | None, export: Path, heldout: list[tuple[str, str]],
                 work: Path) -> dict:
        """Scores of the candidate and the promoted model on one held-out set; saved as eval.json and
        reused by a rerun."""
        cfg = self.cfg
        fp = heldout_fingerprint(cfg, heldout)
        ids = [v for _, v in heldout]
        saved = self._read(attempt, "eval.json") or {}
        if saved.get("heldout", {}).get("fingerprint") == fp:
            return saved
        desc = {"fingerprint": fp, "size": len(ids), "split": None if cfg.heldout.video_ids else cfg.heldout.split,
                "video_ids": ids}
        candidate = score(export, cfg, ids)
        self.log(f"  held-out: candidate {cfg.metric} score {_fmt(candidate['score'])} on {len(ids)} video(s)")
        if current is None:
            cur = {"score": None, "source": "none"}
        elif current.get("metric") == cfg.metric and current.get("heldout", {}).get("fingerprint") == fp:
            cur = {"score": current.get("score"), "source": "pointer"}
        else:  # the held-out set or the scorer changed since its promotion: score it again
            res = score(self.parent_dir(current, work), cfg, ids)
            cur = {"score": res["score"], "source": "re-evaluated", "result": res}
            self.log(f"  held-out: current {current['model_id']} re-evaluated (held-out set or metric changed): "
                     f"{_fmt(res['score'])}")
        evaluation = {"heldout": desc, "candidate": candidate, "current": cur, "evaluated_at": utcnow()}
        self._write(attempt, "eval.json", evaluation)
        return evaluation

    def finish(self, attempt: str) -> dict:
        """Carry out a written decision. Every step is idempotent: publishing skips a complete model, the
        pointer is written only if it does not point there yet, the history ignores a known id."""
        reg = self.reg
        decision = self._read(attempt, "decision.json")
        info = self._read(attempt, "attempt.json")
        evaluation = self._read(attempt, "eval.json") or {}
        existing = next((r for r in reg.history() if r.get("id") == attempt), None)
        if existing is not None:
            return existing
        current = reg.current()
        cur_id = current["model_id"] if current else None
        record = {"id": attempt, "attempt": attempt, "decision": decision["decision"], "reason": decision["reason"],
                  "model_id": decision["model_id"], "parent": decision["parent"], "mode": info["mode"],
                  "candidate_score": decision["candidate_score"], "current_score": decision["current_score"],
                  "current_score_source": decision["current_score_source"], "margin": decision["margin"],
                  "metric": decision["metric"], "heldout_size": decision["heldout"]["size"],
                  "new_shards": info["new_shards"], "train": decision["train"], "decided_at": decision["decided_at"]}
        if decision["decision"] == "promoted":
            if cur_id not in (decision["parent"], decision["model_id"]):
                # the pointer moved (a rollback?) after this decision: promoting now would skip that
                record.update(decision="superseded", reason=f"the registry moved to {cur_id} before this "
                                                            f"promotion was carried out")
            else:
                src = Path(decision["candidate_dir"])
                if not reg.model_complete(decision["model_id"]) and not src.is_dir():
                    raise RuntimeError(f"attempt {attempt}: candidate {src} is gone before it was published "
                                       f"(work_dir lost?); delete {reg.uri(reg.attempt_rel(attempt))} to retrain")
                card = {"model_id": decision["model_id"], "created_at": decision["decided_at"],
                        "parent": decision["parent"], "attempt": attempt, "mode": info["mode"],
                        "metrics": {"metric": decision["metric"], "score": decision["candidate_score"],
                                    "parent_score": decision["current_score"], "margin": decision["margin"],
                                    "result": evaluation.get("candidate"), "heldout": decision["heldout"]},
                        "data": {"features": info["features"], "trained_shards": info["trained_shards"],
                                 "new_shards": info["new_shards"], "train_videos": info["train_videos"]},
                        "train": decision["train"], "config": info["config"]}
                uri = reg.uri(reg.model_rel(decision["model_id"]))
                card["pointer"] = {"model_id": decision["model_id"], "path": uri,
                                   "score": decision["candidate_score"], "metric": decision["metric"],
                                   "heldout": {k: decision["heldout"][k] for k in ("fingerprint", "size", "split")},
                                   "trained_shards": info["trained_shards"], "attempt": attempt,
                                   "parent": decision["parent"], "promoted_at": decision["decided_at"]}
                reg.publish(decision["model_id"], src, card)
                crash_point("after_copy")
                if cur_id != decision["model_id"]:
                    self.lock.check()  # fencing: never swap the pointer without holding the lock
                    reg.set_current(card["pointer"])
                crash_point("after_pointer")
                record["model_path"] = uri
        elif decision["current_score_source"] == "re-evaluated" and cur_id == decision["parent"] and current:
            # keep the promoted model's score current for the new held-out set (same model, one PUT)
            self.lock.check()
            reg.set_current({**current, "score": decision["current_score"], "metric": decision["metric"],
                             "heldout": {k: decision["heldout"][k] for k in ("fingerprint", "size", "split")},
                             "rescored_at": decision["decided_at"]})
        reg.record(record)
        if not self.cfg.keep_checkpoints:
            work = self.work(attempt)
            for stage in ("stage1", "stage2"):
                shutil.rmtree(work / stage / "checkpoints", ignore_errors=True)
            for copy in ("init", "parent"):  # copies of the promoted model's files
                shutil.rmtree(work / copy, ignore_errors=True)
        return record


def rollback(cfg: RetrainConfig, model_id: str) -> dict:
    """Point the registry back at an earlier promoted model (its card's pointer record), under the lock,
    with a history record. The newer shards become new data again for the next run; an attempt already
    decided on the same shards and settings is not retried."""
    reg = Registry(cfg.registry, cfg.registry_options)
    card = reg.card(model_id)
    if card is None or "pointer" not in card:
        raise RetrainInputError(f"--rollback: {reg.uri(reg.model_rel(model_id))} is not a complete promoted model")
    with reg.lock(cfg.lock_ttl_s, note=f"microemo retrain --rollback {model_id}") as lock:
        current = reg.current()
        lock.check()
        reg.set_current({**card["pointer"], "rolled_back_at": utcnow(),
                         "rolled_back_from": current and current["model_id"]})
        reg.record({"id": f"rollback-{lock.token[:12]}", "decision": "rollback", "model_id": model_id,
                    "from": current and current["model_id"]})
    return {"model_id": model_id, "from": current and current["model_id"]}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def retrain(cfg: RetrainConfig, log: Callable[[str], None] = print) -> dict:
    """Run one scheduled retraining step; see the module docstring. Returns ``outcome`` (``locked``,
    ``no_new_data``, ``already_decided``, ``promoted``, ``rejected``, ``superseded``) and details."""
    return Retrain(cfg, log).run()


def format_result(cfg: RetrainConfig, result: dict) -> str:
    """The few lines ``microemo retrain`` prints at the end."""
    reg = cfg.registry
    outcome = result["outcome"]
    if outcome == "locked":
        return f"retrain: another run holds the registry lock ({result['message']}); nothing done"
    if outcome == "no_new_data":
        return (f"retrain: no new data since {result['current'] or 'the start'} "
                f"({result['training_shards']} training shard(s), all trained on); nothing trained "
                f"[check {result['checks']} for this model and data]")
    d = result["decision"]
    if outcome == "already_decided":
        return (f"retrain: nothing new: attempt {result['attempt']} already {d['decision']} a model trained on these "
                f"{len(result['new_shards'])} new shard(s) with these settings ({d['reason']}); nothing trained")
    stages = ", ".join(f"{k} {v.get('step')} steps" for k, v in d["train"].items())
    lines = [f"retrain: {len(result['new_shards'])} new shard(s) since {result['current'] or 'the empty registry'}; "
             f"{result['mode']} ({stages})",
             f"  held-out ({d['heldout']['size']} video(s), {d['metric']}): candidate {_fmt(d['candidate_score'])}, "
             f"current {_fmt(d['current_score'])} ({d['current_score_source']}), margin {d['margin']:g}"]
    if outcome == "promoted":
        lines.append(f"  promoted {d['model_id']} -> {result['record'].get('model_path')} ({d['reason']})")
    elif outcome == "superseded":
        lines.append(f"  not promoted: {result['record']['reason']}")
    else:
        lines.append(f"  rejected {d['model_id']} ({d['reason']}); {reg} still points at {d['parent']}")
    lines.append(f"  history: {Registry(reg, cfg.registry_options).uri('history.jsonl')}")
    return "\n".join(lines)
