"""Training: samples/s and tokens/s of stage 1 and stage 2 at 1 and 2 ranks, the share of step
time spent waiting for data, and ZeRO-2 against ZeRO-3 (step time, peak memory per rank), on
one synthetic feature store in one run.

Every run is ``jobs.train.launch`` with the torchrun launcher on CPU ranks (gloo, one thread
each), so each rank is a process of its own whose peak RSS is read from outside
(``bench.memory``). Stage 2 starts from the stage-1 export of the same rank count. Rates are
steady-state: the first ``warmup`` steps (start-up, prefetch fill) are left out, using the
cumulative counters ``jobs.train`` logs to ``metrics.jsonl`` at every step.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import corpus
from bench.memory import TreeSampler
from bench.report import Goal, Result

MiB = 1 << 20


@dataclass
class Sizes:
    videos: int = 20  # clips in the feature store (shared with the preprocess benchmark)
    steps: int = 30
    warmup: int = 5  # first steps left out of the steady-state rates
    micro_batch: int = 2  # per rank
    preset: str = "tiny"  # model for the 1 vs 2 rank runs
    # ZeRO-2 vs ZeRO-3: a model big enough for sharding to show (the embedded LLM is 0.5 GB in
    # fp32; on 2 CPU cores a step takes tens of seconds, and a rank several GB)
    zero_preset: str = "embedded"
    zero_steps: int = 6
    zero_warmup: int = 2
    zero_micro_batch: int = 1


# quick: the ZeRO-2 run is the stage-2 2-rank run itself (same preset and sizes)
FULL = Sizes()
QUICK = Sizes(videos=4, steps=5, warmup=2, zero_preset="tiny", zero_steps=5, zero_warmup=2, zero_micro_batch=2)

GOAL_SCALING = Goal(">=", 1.6)  # 2 ranks / 1 rank, samples/s
GOAL_DATA_WAIT = Goal("<", 5.0)  # % of step time


def steady(rows: list[dict], warmup: int, samples_per_step: int) -> dict:
    """Rates over the steps after ``warmup`` from rank 0's cumulative metrics.

    ``jobs.train`` logs, at each step, samples/s and tokens/s over the loop time so far and the
    fraction of it spent waiting for data; every step consumes ``samples_per_step`` samples
    (micro-batch x grad. accumulation x ranks). That gives cumulative loop time, samples,
    answer tokens and data wait at each step; their differences are the steady rates.
    """
    def totals(r: dict) -> tuple[float, float, float, float]:
        n = samples_per_step * r["step"]
        t = n / r["samples_per_s"]
        return t, n, r["tokens_per_s"] * t, r["data_wait_frac"] * t

    if len(rows) <= warmup:
        raise ValueError(f"{len(rows)} logged steps, need more than warmup={warmup}")
    (t0, n0, k0, w0), (t1, n1, k1, w1) = totals(rows[warmup - 1]) if warmup else (0, 0, 0, 0), totals(rows[-1])
    dt = t1 - t0
    return {"samples_per_s": (n1 - n0) / dt, "tokens_per_s": (k1 - k0) / dt, "data_wait_frac": (w1 - w0) / dt,
            "step_s": dt / (rows[-1]["step"] - (rows[warmup - 1]["step"] if warmup else 0)),
            "steps": len(rows) - warmup}


@contextlib.contextmanager
def _output_to(path: Path):
    """Send this process's (and its children's) stdout/stderr to ``path`` for the block:
    torchrun and its ranks inherit the file descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(path, "a") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def train_run(out: Path, store: Path, name: str, stage: int, ranks: int, preset: str, steps: int, warmup: int,
              micro_batch: int, zero: int = 2, init: Path | None = None) -> dict:
    """One ``launch`` into ``out/train/name``; steady rates, the summary and peak RSS per rank."""
    from jobs.metrics import read_metrics
    from jobs.train import TrainConfig, ZeroConfig, launch

    run = out / "train" / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = TrainConfig(stage=stage, features=str(store), out=str(run), init=str(init) if init else None,
                      preset=preset, split=None, max_steps=steps, save_every=steps, micro_batch_size=micro_batch,
                      launcher="torchrun", num_workers=ranks, zero=ZeroConfig(stage=zero))
    log = out / "logs" / f"train_{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.unlink(missing_ok=True)
    try:
        with _output_to(log), TreeSampler(include_root=False) as sampler:
            summary = launch(cfg)
        if summary.get("step") != steps:
            raise RuntimeError(f"stopped at step {summary.get('step')} of {steps}")
    except Exception as exc:
        raise RuntimeError(f"training run {name}: {exc}; last output ({log}):\n{log.read_text()[-2000:]}") from exc
    rates = steady(read_metrics(run / "metrics.jsonl"), warmup, micro_batch * ranks)
    per_rank = sampler.memory.ranks()
    return {**rates, "summary": summary, "peak_rss_per_rank": per_rank,
            "peak_rss_max_rank": max(per_rank.values()) if per_rank else None}


def main(ctx) -> Result:
    sizes = QUICK if ctx.quick else FULL
    res = Result("train", ctx.quick, details={"sizes": asdict(sizes)})
    os.environ["DS_ACCELERATOR"] = "cpu"  # CPU ranks even on a GPU machine (the gpu benchmark covers GPUs)
    out = ctx.out
    store = corpus.store(out, sizes.videos)
    print(f"== train: {sizes.preset} preset, {sizes.videos} clips, {sizes.steps} steps, micro-batch "
          f"{sizes.micro_batch} per rank; ZeRO-2 vs 3 on {sizes.zero_preset} ==", flush=True)
    common = dict(steps=sizes.steps, warmup=sizes.warmup, micro_batch=sizes.micro_batch)
    runs: dict[str, dict] = {}
    for stage in (1, 2):
        for ranks in (1, 2):
            name = f"stage{stage}_{ranks}rank"
            print(f"   {name} ...", flush=True)
            init = out / "train" / f"stage1_{ranks}rank" if stage == 2 else None
            runs[name] = train_run(out, store, name, stage, ranks, sizes.preset, init=init, **common)
    zero_sizes = dict(steps=sizes.zero_steps, warmup=sizes.zero_warmup, micro_batch=sizes.zero_micro_batch)
    for zero in (2, 3):
        name = f"zero{zero}_stage2_2rank"
        if zero == 2 and (sizes.zero_preset, zero_sizes) == (sizes.preset, common):
            runs[name] = runs["stage2_2rank"]  # the same run
            continue
        print(f"   {name} ...", flush=True)
        runs[name] = train_run(out, store, name, 2, 2, sizes.zero_preset, zero=zero, **zero_sizes)
    res.details["runs"] = runs

    for stage in (1, 2):
        one, two = runs[f"stage{stage}_1rank"], runs[f"stage{stage}_2rank"]
        for ranks, r in ((1, one), (2, two)):
            label = f"stage {stage}, {ranks} rank{'s' if ranks > 1 else ''}"
            res.add(f"{label}: samples/s", r["samples_per_s"], "samples/s")
            res.add(f"{label}: answer tokens/s", r["tokens_per_s"], "tokens/s")
        res.add(f"stage {stage}: 2 ranks ÷ 1 rank (samples/s)", two["samples_per_s"] / one["samples_per_s"], "×",
                GOAL_SCALING)
    worst = max((k for k in runs if k.startswith("stage")), key=lambda k: runs[k]["data_wait_frac"])
    res.add(f"step time waiting for data (worst run: {worst})", 100 * runs[worst]["data_wait_frac"], "%",
            GOAL_DATA_WAIT)
    z2, z3 = runs["zero2_stage2_2rank"], runs["zero3_stage2_2rank"]
    for zero, r in ((2, z2), (3, z3)):
        res.add(f"ZeRO-{zero}, stage 2, 2 ranks ({sizes.zero_preset}): step time", r["step_s"], "s")
        mem = r["peak_rss_max_rank"]
        res.add(f"ZeRO-{zero}, stage 2, 2 ranks ({sizes.zero_preset}): peak RSS per rank",
                mem / MiB if mem else None, "MiB")
    res.add("ZeRO-3 ÷ ZeRO-2 step time", z3["step_s"] / z2["step_s"], "×")
    if z2["peak_rss_max_rank"] and z3["peak_rss_max_rank"]:
        res.add("ZeRO-3 ÷ ZeRO-2 peak RSS per rank", z3["peak_rss_max_rank"] / z2["peak_rss_max_rank"], "×")
    return res
