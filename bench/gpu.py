"""GPU plan: stage-2 forward + backward throughput per GPU and model FLOPs utilisation (MFU) at
the ``paper`` preset's shapes (EVA-CLIP-sized frame tokens, BLIP-2-sized Q-Formers, a 7B Llama
with LoRA r=16). Runs only where CUDA is present; elsewhere it records "skipped: no CUDA".

The LLM is Llama-2-7B from ``llm.path`` when that directory exists, else a random Llama of the
same architecture (``llm.source=random``: built on the GPU, no files; it brings the byte-level
tokenizer, so text costs about 4x the tokens Llama's tokenizer would give it). The whole model
is in bf16, as under DeepSpeed's bf16 engine. One step = forward, loss, backward (no
optimizer step, which does not depend on the token count); the batch is fixed and resident on
the GPU, so the number is the model's, without data loading.

MFU = model FLOPs per step / step time / the GPU's peak dense bf16 FLOP/s. Model FLOPs are
counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` over one step counts every
matmul, convolution and attention kernel that actually runs, forward and backward. For LoRA on a
frozen base that is about 4 FLOPs per LLM weight per token (2 forward, 2 for the input gradients
backward; no weight gradients), not the 6 of full training. The widely quoted 6·N_total·tokens
figure is recorded as well, labelled as that convention (it overstates the work here).
docs/benchmarks.md derives both.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.report import Result

# Peak dense (no 2:4 sparsity) bf16 tensor FLOP/s, TFLOP/s, from the vendors' data sheets. Matched
# as whole words against torch.cuda.get_device_name(), most specific first; BENCH_PEAK_TFLOPS
# overrides (e.g. for clocks or a GPU not listed).
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0),
)


@dataclass
class Sizes:
    micro_batch: int = 4  # clips per step (halved on out-of-memory)
    seconds: float = 10.0  # clip length: frames at 2 fps, 1-s audio windows
    utterances: int = 3
    warmup: int = 3
    steps: int = 10


FULL, QUICK = Sizes(), Sizes(micro_batch=2, warmup=1, steps=3)


def peak_tflops(device_name: str) -> float | None:
    """Peak dense bf16 TFLOP/s of a GPU by name (None when unknown and BENCH_PEAK_TFLOPS is unset)."""
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"])
    for key, value in PEAK_BF16_TFLOPS:
        if re.search(rf"(?<![A-Za-z0-9]){re.escape(key)}(?![A-Za-z0-9])", device_name):
            return value
    return None


def make_sample(cfg, i: int, seconds: float, n_utt: int) -> dict:
    """A feature-store-like sample with the config's feature sizes: frames at 2 fps, 1-s audio
    windows, ``n_utt`` utterances evenly spread, a description-length answer."""
    f = cfg.features
    rng = np.random.default_rng(i)
    n, w = int(seconds * 2), int(np.ceil(seconds))
    pts = (np.arange(n) / 2.0).astype(np.float32)
    bounds = np.linspace(0.0, seconds, n_utt + 1)
    utts = [(float(a) + 0.2, float(b) - 0.2) for a, b in zip(bounds[:-1], bounds[1:])]
    return {
        "video_id": f"clip{i}", "duration_s": seconds, "split": "train", "frame_pts": pts,
        "global_feat": rng.standard_normal((n, f.global_tokens, f.global_dim), np.float32),
        "face_found": np.ones(n, bool), "face_feat": rng.standard_normal((n, f.face_dim), np.float32),
        "face_delta": 0.05 * rng.standard_normal((n, f.face_dim), np.float32),
        "dynamics": np.abs(rng.standard_normal((n, f.dynamics_dim), np.float32)),
        "audio_feat": rng.standard_normal((w, f.audio_dim), np.float32),
        "audio_span": np.stack([np.arange(w), np.arange(w) + 1.0], 1).astype(np.float32),
        "utterances": [{"start_s": s, "end_s": e, "text": "I really did not expect to see you here today.",
                        "speaker": "A"} for s, e in utts],
        "labels": ["surprised", "happy"],
        "description": "At 1.20-1.45 s the brows lift and the eyes widen briefly; the voice rises in pitch and "
                       "speeds up (0.2-3.1 s) and the words express surprise. The face, voice and words reveal "
                       "the emotion: the speaker is surprised, happy.",
        "utterance_labels": [{"start_s": s, "end_s": e, "labels": ["surprised"]} for s, e in utts],
    }


def measure(cfg, device: str, sizes: Sizes) -> dict:
    """Build the model for ``cfg`` on ``device`` (bf16 on CUDA) and time stage-2 fwd+bwd steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.microemo import MicroEmo, count_parameters

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build every module in the training dtype, on the device
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = MicroEmo.from_config(cfg, device=device)
    finally:
        torch.set_default_dtype(before)
    model.to(dtype)
    trainable = [p for _, p in model.set_stage(2)]
    model.train()
    counts = count_parameters(cfg)

    batch_size = sizes.micro_batch
    while True:
        samples = [make_sample(cfg, i, sizes.seconds, sizes.utterances) for i in range(batch_size)]
        batch = model.collator(train=True)(samples).to(device)
        try:
            timed = _time_steps(model, batch, trainable, device, sizes)
            break
        except torch.cuda.OutOfMemoryError:
            if batch_size == 1:
                raise
            batch_size //= 2
            for p in trainable:
                p.grad = None
            torch.cuda.empty_cache()
    with FlopCounterMode(display=False) as counter:
        _step(model, batch, trainable)
    llm = cfg.llm
    return {**timed, "micro_batch": batch_size, "tokens_per_step": int(batch.attention_mask.sum()),
            "sequence_length": int(batch.attention_mask.shape[1]), "frames_per_clip": int(sizes.seconds * 2),
            "flops_per_step": int(counter.get_total_flops()), "parameters": counts,
            "llm": {"source": llm.source, "path": llm.path, "layers": llm.layers, "hidden": llm.hidden_size},
            "dtype": str(dtype).removeprefix("torch.")}


def _step(model, batch, trainable):
    """Forward, loss, backward; gradients dropped (no optimizer step)."""
    out = model(batch)
    out.loss.backward()
    for p in trainable:
        p.grad = None
    return out


def _time_steps(model, batch, trainable, device: str, sizes: Sizes) -> dict:
    import torch

    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(sizes.warmup):
        _step(model, batch, trainable)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(sizes.steps):
        out = _step(model, batch, trainable)
    sync()
    return {"step_s": (time.perf_counter() - t0) / sizes.steps, "answer_tokens_per_step": out.answer_tokens,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None}


def paper_config():
    """The paper preset; a random Llama of the same shape unless the Llama-2 directory exists."""
    from model.config import preset

    cfg = preset("paper")
    if not (Path(cfg.llm.path) / "config.json").is_file():
        cfg.llm.source = "random"
    return cfg


def main(ctx) -> Result:
    import torch

    sizes = QUICK if ctx.quick else FULL
    res = Result("gpu", ctx.quick, details={"sizes": asdict(sizes)})
    metric = "stage 2 fwd+bwd per GPU, paper shapes"
    if not torch.cuda.is_available():
        res.skip(metric, "no CUDA")
        return res
    name = torch.cuda.get_device_name(0)
    print(f"== gpu: {name}, paper preset, stage 2 forward + backward ==", flush=True)
    m = measure(paper_config(), "cuda", sizes)
    peak = peak_tflops(name)
    tokens_per_s = m["tokens_per_step"] / m["step_s"]
    achieved = m["flops_per_step"] / m["step_s"]
    six_n = 6 * m["parameters"]["total"] * m["tokens_per_step"] / m["step_s"]
    res.details.update(m, device=name, peak_bf16_tflops=peak, achieved_tflops=achieved / 1e12,
                       six_n_tflops=six_n / 1e12)
    llm = "random Llama-2-7B shape" if m["llm"]["source"] == "random" else "Llama-2-7B"
    res.add(f"{metric} ({llm}, {m['micro_batch']} clips × {m['sequence_length']} tokens): tokens/s", tokens_per_s,
            "tokens/s")
    res.add("step time (fwd+bwd)", m["step_s"], "s")
    res.add("achieved model FLOP/s (counted)", achieved / 1e12, "TFLOP/s")
    if peak:
        res.add(f"MFU, counted FLOPs (peak {peak:.0f} TFLOP/s bf16 dense)", 100 * achieved / (peak * 1e12), "%")
        res.add("MFU, 6·N_total·tokens convention (overstates LoRA work)", 100 * six_n / (peak * 1e12), "%")
    else:
        res.skip("MFU", f"peak FLOP/s of {name!r} unknown: set BENCH_PEAK_TFLOPS")
    res.add("peak GPU memory", m["peak_memory_bytes"] / 2**30, "GiB")
    return res
