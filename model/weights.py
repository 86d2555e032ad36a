"""Saving and loading what training changes: safetensors + a PEFT adapter directory, never pickle.

A weights directory::

    microemo.safetensors      every parameter outside the LLM (encoders, Q-Formers, projections)
    model_config.json         the MicroEmoConfig it was built with
    adapter/                  the LoRA adapter as peft writes it (adapter_config.json +
                              adapter_model.safetensors); ``PeftModel.from_pretrained(base, dir)``
                              loads it in any process. Absent when the config has no LoRA.

The LLM's own weights are not saved: they are the base model named by the config (a local
directory, the GGUF cache, or the seeded random tiny model).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from model.config import MicroEmoConfig, config_from_dict, to_dict

MODULES_FILE = "microemo.safetensors"
CONFIG_FILE = "model_config.json"
ADAPTER_DIR = "adapter"


def module_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State of every module outside the LLM (name -> tensor), as saved in ``microemo.safetensors``."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("llm.")}


def save_weights(model, out_dir: str | Path) -> Path:
    """Write the modules, the config and the LoRA adapter of a ``MicroEmo`` to ``out_dir``; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in module_state(model).items()}
    save_file(state, out / MODULES_FILE, metadata={"format": "pt", "preset": model.cfg.name})
    (out / CONFIG_FILE).write_text(json.dumps(to_dict(model.cfg), indent=1))
    if hasattr(model.llm, "peft_config"):
        # the adapter only: LoRA on lm_head changes no base weight, so none are copied in
        model.llm.save_pretrained(out / ADAPTER_DIR, safe_serialization=True, save_embedding_layers=False)
    return out


def load_config(in_dir: str | Path) -> MicroEmoConfig:
    """The config saved beside the weights."""
    return config_from_dict(MicroEmoConfig, json.loads((Path(in_dir) / CONFIG_FILE).read_text()))


def load_weights(model, in_dir: str | Path, adapter: bool = True) -> None:
    """Load saved modules (strict: names and shapes must match) and, if present and wanted, the adapter."""
    src = Path(in_dir)
    state = load_file(src / MODULES_FILE, device=str(model.device))
    own = module_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{src / MODULES_FILE} does not match this model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]} (saved with other ablations or preset?)")
    for k, v in state.items():
        if v.shape != own[k].shape:
            raise ValueError(f"{src / MODULES_FILE}: {k} has shape {tuple(v.shape)}, model has {tuple(own[k].shape)}")
    model.load_state_dict(state, strict=False)
    adapter_file = src / ADAPTER_DIR / "adapter_model.safetensors"
    if adapter and adapter_file.is_file():
        if not hasattr(model.llm, "peft_config"):
            raise ValueError(f"{src} has a LoRA adapter but this model has none (llm.lora.rank=0)")
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model.llm, load_file(adapter_file, device=str(model.device)))
        bad = [k for k in result.unexpected_keys if "lora_" in k]
        if bad:
            raise ValueError(f"{adapter_file} does not match this model's adapter: unexpected {bad[:5]}")
