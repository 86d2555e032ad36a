"""``microemo train``: the two training stages as DeepSpeed ZeRO jobs.

One training function (``train_loop``) runs on every rank; launchers only start ranks:

- ``ray`` (default): Ray Train ``TorchTrainer`` on a local Ray or an existing cluster
  (``--address``), ``--num-workers`` ranks, ``--use-gpu``;
- ``torchrun``: ``torchrun``/``deepspeed`` style, ``RANK``/``WORLD_SIZE`` from the environment
  (bare metal, Slurm); started with ``python -m torch.distributed.run ... -m jobs.train CONFIG``;
- ``local``: one process, one rank.

Stage 1 trains everything but the LLM; stage 2 adds LoRA and starts from stage 1's export
(``--init RUN1``). Each run directory holds::

    config.yaml                 the resolved TrainConfig
    checkpoints/step<N>/        DeepSpeed checkpoints (ZeRO shards, optimizer, scheduler) + latest
    checkpoints/step<N>/rng_rank<R>.safetensors   per-rank torch RNG state
    metrics.jsonl, tensorboard/, loss.png
    export/microemo.safetensors    every non-LLM weight (gathered under ZeRO-3; model.weights layout)
    export/adapter/             the LoRA adapter as a PEFT directory (stage 2)
    export/model_config.json    the model config (rebuild with model.config.config_from_dict)

Resume (``--resume``) restores model, optimizer, scheduler, RNG, step and data position from the
latest checkpoint. A SIGTERM (preemption) makes every rank save a checkpoint at the next step
boundary and exit cleanly.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAUNCHERS = ("ray", "torchrun", "local")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    clip_grad: float = 1.0


@dataclass
class ZeroConfig:
    stage: int = 2  # 2 (default) or 3
    offload_optimizer: bool = False  # optimizer state in CPU memory
    offload_params: bool = False  # ZeRO-3 only: parameters in CPU memory
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; or bf16 / fp32


@dataclass
class TrainConfig:
    stage: int = 1
    features: str = ""
    out: str = ""
    init: str | None = None  # stage 2: the stage-1 run directory
    resume: bool = False
    preset: str = "tiny"  # model preset (model.config.preset)
    model: dict = field(default_factory=dict)  # overrides onto the preset, e.g. {ablations: {audio: false}}
    split: str | None = "train"
    max_steps: int = 100
    micro_batch_size: int = 2
    grad_accum: int = 1
    seed: int = 0
    save_every: int = 50
    log_every: int = 1
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    launcher: str = "ray"
    num_workers: int = 2
    use_gpu: bool = False
    address: str | None = None
    storage_options: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage}")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, got {self.launcher!r}")
        if self.zero.stage not in (2, 3):
            raise ValueError(f"zero.stage must be 2 or 3, got {self.zero.stage}")
        if self.zero.offload_params and self.zero.stage != 3:
            raise ValueError("zero.offload_params needs zero.stage=3")
        if self.zero.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(f"zero.precision must be auto, bf16 or fp32, got {self.zero.precision!r}")
        for name in ("max_steps", "micro_batch_size", "grad_accum", "save_every", "log_every", "num_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# ---------------------------------------------------------------------------- pieces

def deepspeed_config(cfg: TrainConfig, world_size: int, on_gpu: bool) -> dict:
    """The DeepSpeed config for this run: ZeRO stage, offload, precision, batch sizes, clipping."""
    bf16 = cfg.zero.precision == "bf16" or (cfg.zero.precision == "auto" and on_gpu)
    zero: dict[str, Any] = {"stage": cfg.zero.stage, "overlap_comm": on_gpu, "contiguous_gradients": True}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if cfg.zero.stage == 3:
        # exports gather the 16-bit weights on rank 0 (zero_to_fp32 still works on the shards)
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.micro_batch_size * cfg.grad_accum * world_size,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # a torch AdamW: no fused-Adam JIT build
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig):
    """Linear warmup to lr, then cosine down to lr * min_lr_ratio at max_steps."""
    warm, total, floor = cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def model_config(cfg: TrainConfig, store) -> Any:
    """The preset, the run's overrides, and feature sizes read from the store's metadata."""
    import pyarrow.parquet as pq

    from model.config import FeatureDims, MicroEmoConfig, config_from_dict, preset, to_dict

    base = to_dict(preset(cfg.preset))
    _merge(base, cfg.model)
    mcfg = config_from_dict(MicroEmoConfig, base)
    with store.fs.open(store.path("frames", f"part-{store.shards('frames')[0]}.parquet"), "rb") as f:
        frames = pq.read_schema(f)
    with store.fs.open(store.path("audio", f"part-{store.shards('audio')[0]}.parquet"), "rb") as f:
        audio = pq.read_schema(f)

    def meta(schema, col, key):
        return int(schema.field(col).metadata[key.encode()])

    mcfg.features = FeatureDims(global_tokens=meta(frames, "global_feat", "tokens"),
                                global_dim=meta(frames, "global_feat", "dim"),
                                face_dim=meta(frames, "face_feat", "dim"), dynamics_dim=meta(frames, "dynamics", "dim"),
                                audio_dim=meta(audio, "audio_feat", "dim"))
    return mcfg


def _merge(base: dict, over: dict, prefix: str = "") -> None:
    for k, v in over.items():
        if k not in base:
            raise ValueError(f"model override {prefix}{k}: no such model config key")
        if isinstance(v, dict) and isinstance(base[k], dict):
            _merge(base[k], v, f"{prefix}{k}.")
        else:
            base[k] = v


def latest_checkpoint(run: Path) -> str | None:
    latest = run / "checkpoints" / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def load_init(model, init_run: str) -> None:
    """Stage 2 starts from an export: stage 1's modules (safetensors, strict names and shapes) and, when
    the export is a stage-2 one (retraining from a promoted model), its LoRA adapter too."""
    from model.weights import MODULES_FILE, load_weights

    export_dir = Path(init_run) / "export"
    if not (export_dir / MODULES_FILE).is_file():
        raise FileNotFoundError(f"--init {init_run}: no export/{MODULES_FILE} (did stage 1 finish?)")
    load_weights(model, export_dir)  # a stage-2 export (retrain) brings its adapter too


# ---------------------------------------------------------------------------- the loop

class _Preempted:
    """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.flag = False
        try:
            signal.signal(signal.SIGTERM, self._set)
        except ValueError:  # not the main thread (some Ray setups): no preemption hook
            pass

    def _set(self, *_):
        self.flag = True


def train_loop(cfg_dict: dict) -> dict:
    """Train on this rank (the process group, if any, is already up). Returns a summary on every rank."""
    import deepspeed
    import torch
    import torch.distributed as dist

    from jobs.config import from_dict
    from jobs.data import SampleStream, check_store
    from jobs.metrics import MetricsLogger, check_finite
    from model.microemo import MicroEmo
    from pipeline.store import FeatureStore

    cfg = from_dict(TrainConfig, cfg_dict)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo", auto_mpi_discovery=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if cfg.use_gpu and torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    run = Path(cfg.out)
    store = FeatureStore(cfg.features, cfg.storage_options)
    check_store(store)

    torch.manual_seed(cfg.seed)
    mcfg = model_config(cfg, store)
    model = MicroEmo.from_config(mcfg, device=device)
    if cfg.stage == 2 and cfg.init:
        load_init(model, cfg.init)
    trainable = model.set_stage(cfg.stage)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world, device.type == "cuda"))
    collate = model.collator(train=True)

    step, epoch, position = 0, 0, 0
    if cfg.resume and latest_checkpoint(run) is not None:
        _, client = engine.load_checkpoint(str(run / "checkpoints"), load_module_strict=False)
        step, epoch, position = client["step"], client["epoch"], client["position"]
        _load_rng(run / "checkpoints" / f"step{step}", rank)
    log = MetricsLogger(run, enabled=rank == 0, stage=cfg.stage)
    preempt = _Preempted()
    if len(SampleStream(store, cfg.split, rank, world, cfg.seed, epoch, 0)) == 0:
        raise ValueError(f"{cfg.features}: no usable samples in split {cfg.split!r} for {world} rank(s)")

    def batches():
        """Collated micro-batches with the (epoch, position) reached after each; epochs reshuffle."""
        ep, stream = epoch, SampleStream(store, cfg.split, rank, world, cfg.seed, epoch, position)
        it = iter(stream)
        while True:
            samples = []
            while len(samples) < cfg.micro_batch_size:
                try:
                    samples.append(next(it))
                except StopIteration:
                    ep += 1
                    stream = SampleStream(store, cfg.split, rank, world, cfg.seed, ep, 0)
                    it = iter(stream)
            yield collate(samples), ep, stream.position

    # a background thread reads and collates the next batches while this one trains
    loader = Prefetcher(batches(), depth=2)

    from tqdm import tqdm

    bar = tqdm(total=cfg.max_steps, initial=step, desc=f"stage {cfg.stage}", unit="step", disable=rank != 0)
    t_data = t_total = 0.0
    n_samples = n_tokens = 0
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        losses, summary_losses = [], []
        for _ in range(cfg.grad_accum):
            td = time.perf_counter()
            batch, epoch, position = loader.get()
            batch = batch.to(device)
            t_data += time.perf_counter() - td
            out = engine(batch)
            engine.backward(out.loss)
            engine.step()
            losses.append(float(out.loss.detach()))
            if out.summary_loss is not None:
                summary_losses.append(float(out.summary_loss.detach()))
            n_samples += len(batch)
            n_tokens += out.answer_tokens
        step += 1
        loss = torch.tensor(sum(losses) / len(losses), device=device)  # NCCL reduces only GPU tensors
        dist.all_reduce(loss)
        loss = float(loss) / world
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else None
        check_finite(step, loss=loss, grad_norm=grad_norm)
        t_total += time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            log.log(step, loss=loss, lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                    samples_per_s=n_samples * world / max(t_total, 1e-9),
                    tokens_per_s=n_tokens * world / max(t_total, 1e-9),
                    data_wait_frac=t_data / max(t_total, 1e-9), epoch=epoch,
                    # the dynamics summary's own loss, part of `loss` (rank 0's micro-batches)
                    **({"summary_loss": sum(summary_losses) / len(summary_losses)} if summary_losses else {}))
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
        stop = _agree(preempt.flag, device)
        if step % cfg.save_every == 0 or step == cfg.max_steps or stop:
            _save(engine, run, step, epoch, position, rank)
        if stop:
            break
    bar.close()
    loader.close()
    if step >= cfg.max_steps:
        export(engine, model, mcfg, run, rank)
    log.close()
    summary = {"step": step, "loss": loss, "preempted": step < cfg.max_steps, "world_size": world,
               "samples_per_s": n_samples * world / max(t_total, 1e-9), "data_wait_frac": t_data / max(t_total, 1e-9)}
    if rank == 0:
        (run / "summary.json").write_text(json.dumps(summary))
    dist.barrier()
    return summary


class Prefetcher:
    """Runs a generator in a daemon thread, ``depth`` items ahead; errors surface in ``get``."""

    _END = object()

    def __init__(self, gen, depth: int = 2):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._gen = gen
        self._thread = threading.Thread(target=self._run, daemon=True, name="microemo-prefetch")
        self._thread.start()

    def _run(self):
        try:
            for item in self._gen:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.2)
                        break
                    except Exception:  # queue.Full: check for stop, then retry
                        continue
                if self._stop.is_set():
                    return
        except BaseException as exc:  # the training loop re-raises it
            self._q.put(exc)
            return
        self._q.put(self._END)

    def get(self):
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            raise StopIteration
        return item

    def close(self):
        self._stop.set()


def _agree(flag: bool, device) -> bool:
    """Stop together: any rank's SIGTERM stops all ranks at the same step."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=device)  # on the GPU under NCCL
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _save(engine, run: Path, step: int, epoch: int, position: int, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    tag = f"step{step}"
    # the data position is the same on every rank: all ranks consume equal-length streams
    engine.save_checkpoint(str(run / "checkpoints"), tag=tag,
                           client_state={"step": step, "epoch": epoch, "position": position})
    save_file({"torch": torch.get_rng_state()}, str(run / "checkpoints" / tag / f"rng_rank{rank}.safetensors"))


def _load_rng(folder: Path, rank: int) -> None:
    import torch
    from safetensors.torch import load_file

    path = folder / f"rng_rank{rank}.safetensors"
    if path.is_file():
        torch.set_rng_state(load_file(str(path))["torch"])


def export(engine, model, mcfg, run: Path, rank: int) -> None:
    """``model.weights`` layout in RUN/export: non-LLM modules as safetensors, the LoRA adapter as a
    PEFT directory, the model config."""
    import deepspeed
    import torch.distributed as dist

    from model.weights import save_weights

    params = [p for _, p in model.named_parameters()]
    # ZeRO-3 shards every parameter: gather them (read-only) so rank 0 writes full tensors
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=engine.zero_optimization_stage() == 3):
        if rank == 0:
            save_weights(model, run / "export")
    dist.barrier()


# ---------------------------------------------------------------------------- launchers

def _ray_worker(cfg_dict: dict) -> None:
    import ray.train

    summary = train_loop(cfg_dict)
    ray.train.report(summary)


def launch(cfg: TrainConfig) -> dict:
    """Start the ranks with the configured launcher; returns rank 0's summary."""
    from jobs.config import save_config, to_dict

    run = Path(cfg.out)
    if not cfg.resume and latest_checkpoint(run) is not None:
        # a second run into the same directory would mix its checkpoints and metrics with these
        raise FileExistsError(f"{run} already holds a run (checkpoints/{latest_checkpoint(run)}): "
                              f"pass --resume to continue it, or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    cfg_dict = to_dict(cfg)
    if cfg.launcher == "local":
        _single_process_group()
        return train_loop(cfg_dict)
    if cfg.launcher == "torchrun":
        return _torchrun(cfg, run)
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.run import ray_address

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_address(cfg.address), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": os.environ["DS_ACCELERATOR"]}})
        started = True
    try:
        trainer = TorchTrainer(
            _ray_worker, train_loop_config=cfg_dict,
            scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
            torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            run_config=RunConfig(name=f"stage{cfg.stage}", storage_path=str((run / "ray").resolve())))
        result = trainer.fit()
        if result.error:
            raise result.error
        return json.loads((run / "summary.json").read_text())
    finally:
        if started:
            ray.shutdown()


def _single_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)  # DeepSpeed reads these
        # an explicit init_method, not MASTER_PORT in the environment: child processes would
        # inherit the port and collide with this process's store
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg: TrainConfig, run: Path) -> dict:
    """``python -m torch.distributed.run --nproc-per-node N -m jobs.train RUN/.rank_config.json``."""
    import subprocess
    import sys

    from jobs.config import to_dict

    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # config.yaml is redacted; the ranks need the real storage options: a private copy
    private = run / ".rank_config.json"
    private.touch(mode=0o600)
    private.write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cfg.num_workers),
           "--master-port", str(_free_port()), "-m", "jobs.train", str(private)]
    proc = subprocess.run(cmd, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}")
    summary = run / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else {}


def main(argv: list[str] | None = None) -> int:
    """Entry for a rank started by torchrun/deepspeed: ``python -m jobs.train CONFIG`` (YAML or JSON)."""
    import sys

    from jobs.config import load_config, to_dict

    argv = sys.argv[1:] if argv is None else argv
    cfg = load_config(TrainConfig, argv[0])
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.use_gpu else "cpu")
    train_loop(to_dict(cfg))  # rank 0 writes RUN/summary.json
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
