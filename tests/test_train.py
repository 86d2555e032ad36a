"""Two-stage training on a synth feature store: 2 ranks with gloo, DeepSpeed ZeRO-2 and ZeRO-3,
through torchrun and Ray Train; SIGKILL + resume; zero_to_fp32; the PEFT adapter in a fresh process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jobs.metrics import read_metrics
from jobs.train import TrainConfig, ZeroConfig, launch

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _cpu_env(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def run_stage(store, out, stage, launcher, zero, init=None, steps=3, **kw):
    cfg = TrainConfig(stage=stage, features=str(store), out=str(out), init=str(init) if init else None,
                      launcher=launcher, num_workers=2, max_steps=steps, save_every=steps, micro_batch_size=1,
                      split=None, zero=ZeroConfig(stage=zero), **kw)
    return launch(cfg)


@pytest.fixture(scope="module")
def two_stage_torchrun(synth_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_torchrun")
    s1 = run_stage(synth_store, root / "s1", 1, "torchrun", 2)
    s2 = run_stage(synth_store, root / "s2", 2, "torchrun", 2, init=root / "s1")
    return root, s1, s2


@pytest.mark.parametrize("launcher, zero", [("torchrun", 2), ("ray", 3)])
def test_stage1_then_stage2(synth_store, tmp_path, two_stage_torchrun, launcher, zero):
    if launcher == "torchrun":
        root, s1, s2 = two_stage_torchrun
    else:
        root = tmp_path
        s1 = run_stage(synth_store, root / "s1", 1, launcher, zero)
        s2 = run_stage(synth_store, root / "s2", 2, launcher, zero, init=root / "s1")
    for summary, run in ((s1, root / "s1"), (s2, root / "s2")):
        assert summary["step"] == 3 and summary["world_size"] == 2 and np.isfinite(summary["loss"])
        rows = read_metrics(run / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2, 3]
        assert all(k in rows[-1] for k in ("loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s",
                                             "data_wait_frac"))
        assert (run / "loss.png").is_file() and (run / "config.yaml").is_file()
        assert (run / "export" / "microemo.safetensors").is_file()
        assert (run / "checkpoints" / "latest").read_text().strip() == "step3"
    assert (root / "s2" / "export" / "adapter" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    w1 = load_file(str(root / "s1" / "export" / "microemo.safetensors"))
    w2 = load_file(str(root / "s2" / "export" / "microemo.safetensors"))
    assert set(w1) == set(w2) and not any(k.startswith("llm.") for k in w1)


def test_sigkilled_run_resumes_to_the_same_losses(synth_store, tmp_path):
    cfg = dict(stage=1, features=str(synth_store), launcher="local", max_steps=10, save_every=4,
               micro_batch_size=2, split=None)
    ref = tmp_path / "ref"
    launch(TrainConfig(out=str(ref), **cfg))
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--stage", "1", "--features", str(synth_store), "--out",
           str(killed), "--launcher", "local", "max_steps=10", "save_every=4", "micro_batch_size=2", "split=null"]
    errors = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(cmd, stdout=errors, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        latest = killed / "checkpoints" / "latest"
        while time.time() < deadline and not (latest.is_file() and latest.read_text().strip() == "step4"):
            assert proc.poll() is None, "finished before it could be killed: " + \
                (tmp_path / "killed.log").read_text()[-2000:]
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (killed / "export").exists()
    launch(TrainConfig(out=str(killed), resume=True, **cfg))
    want = {r["step"]: r["loss"] for r in read_metrics(ref / "metrics.jsonl")}
    got = {r["step"]: r["loss"] for r in read_metrics(killed / "metrics.jsonl")}  # later rows win
    assert [s for s in range(5, 11)] == sorted(s for s in got if s > 4)
    assert np.allclose([got[s] for s in range(5, 11)], [want[s] for s in range(5, 11)], rtol=1e-5, atol=1e-6)


def test_zero_to_fp32_and_the_adapter_in_a_fresh_process(two_stage_torchrun, tmp_path):
    import torch

    root, _, _ = two_stage_torchrun
    run = root / "s2"
    ckpt = run / "checkpoints"
    out = tmp_path / "fp32"
    subprocess.run([sys.executable, str(ckpt / "zero_to_fp32.py"), str(ckpt), str(out), "--safe_serialization"],
                   check=True, capture_output=True)
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    assert files, "zero_to_fp32 wrote nothing"
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    lora = {k: v for k, v in state.items() if "lora_" in k}
    assert lora and any(k.startswith("visual.") for k in state)
    exported = load_file(str(run / "export" / "microemo.safetensors"))
    common = set(exported) & set(state)  # the export also holds buffers; zero_to_fp32 only parameters
    assert len(common) > 10
    for k in common:
        assert torch.allclose(state[k].float(), exported[k].float(), atol=1e-6), k

    # the adapter, loaded by PeftModel in a fresh process, gives the logits of the trained LoRA weights
    script = f"""
import json, sys, torch
from peft import PeftModel
from model.config import LLMConfig, config_from_dict
from model.llm import random_llm
cfg = json.load(open({str(run / 'export' / 'model_config.json')!r}))["llm"]
llm = random_llm(config_from_dict(LLMConfig, cfg))
model = PeftModel.from_pretrained(llm, {str(run / 'export' / 'adapter')!r}).eval()
ids = torch.arange(1, 17)[None]
with torch.no_grad():
    logits = model(input_ids=ids).logits
torch.save(logits, sys.argv[1])
"""
    logits_file = tmp_path / "logits.pt"
    subprocess.run([sys.executable, "-c", script, str(logits_file)], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parents[1])
    fresh = torch.load(logits_file, weights_only=True)

    from model.config import LLMConfig, config_from_dict
    from model.llm import add_lora, random_llm
    from model.config import LoRAConfig

    cfg = json.loads((run / "export" / "model_config.json").read_text())["llm"]
    llm_cfg = config_from_dict(LLMConfig, cfg)
    mine = add_lora(random_llm(llm_cfg), llm_cfg.lora if isinstance(llm_cfg.lora, LoRAConfig)
                    else config_from_dict(LoRAConfig, llm_cfg.lora))
    weights = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.") and "lora_" in k}
    missing, unexpected = mine.load_state_dict(weights, strict=False)
    assert not unexpected
    mine.eval()
    with torch.no_grad():
        expect = mine(input_ids=torch.arange(1, 17)[None]).logits
    assert torch.allclose(fresh, expect, atol=1e-5)
