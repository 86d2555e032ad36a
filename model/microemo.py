"""MicroEmo: frames, faces, audio and transcript -> an explanation and emotion labels.

    frames --VisualEncoder--> per-frame tokens --UtteranceVideo--> [clip; utterance segments] tokens
    audio windows --AudioEncoder--> audio tokens
    both --Linear--> LLM hidden size --> placed into the prompt's placeholders (inputs_embeds)
    LLM (+ LoRA) --> answer text --parse_answer--> explanation, labels, per-utterance labels

Usage::

    model = MicroEmo.from_config(preset("embedded"), device="cpu")
    batch = model.collator(train=False)(samples).to(device)
    answers = model.generate(batch)                 # list[Answer]
    model.set_stage(1); loss = model(model.collator()(samples)).loss

Training stages (``set_stage``): 1 = every module except the LLM (frozen); 2 = stage 1's
modules + the LoRA adapter. The features are precomputed, so there are no frozen encoders here.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import StoppingCriteria, StoppingCriteriaList

from model.audio import AudioEncoder
from model.batch import IGNORE, Batch, Collator
from model.config import MicroEmoConfig, preset
from model.llm import add_lora, llama_config, load_llm
from model.prompt import AUDIO, VIDEO, Answer, parse_answer
from model.video import DynamicsSummary, UtteranceVideo
from model.visual import VisualEncoder


# Bumped whenever generate's decoding changes, so stored predictions made another way are not reused
# (jobs.predict keys its tables by it). 2: loop guard and the appended "Emotions:" line.
GENERATION_VERSION = 2


@dataclass
class Output:
    # mean cross-entropy over answer tokens (nats per token; weighted: prompt.label_weight),
    # + visual.summary_loss x summary_loss
    loss: torch.Tensor
    answer_tokens: int
    summary_loss: torch.Tensor | None = None  # the dynamics summary's word cross-entropy (clip windows)


@dataclass
class Encoded:
    """Projected multimodal tokens, in prompt order: video (B, Nv * (1 + S), H), audio (B, Na, H),
    each with a (B, N) bool mask of the tokens that have placeholders; None where the branch is off."""

    video: torch.Tensor | None
    video_mask: torch.Tensor | None
    audio: torch.Tensor | None
    audio_mask: torch.Tensor | None
    summary_scores: torch.Tensor | None = None  # (B, 1 + S, K) word scores per window (dynamics summary)
    summary_on: torch.Tensor | None = None  # (B, 1 + S) bool: the window has a face frame


class MicroEmo(nn.Module):
    def __init__(self, cfg: MicroEmoConfig, llm: nn.Module, tokenizer=None):
        super().__init__()
        self.cfg = cfg
        ab = cfg.ablations
        hidden = cfg.llm.hidden_size
        self.visual = VisualEncoder(cfg.features, cfg.visual, cfg.time, ab) if ab.video else None
        self.video = UtteranceVideo(cfg.video, self.visual.out_dim, utterance=ab.utterance) if ab.video else None
        self.video_proj = nn.Linear(self.video.out_dim, hidden) if ab.video else None
        # cfg.visual.dynamics_summary: scores of the summary words per window (zero at the start: the
        # token is the plain mean of the words)
        self.video_summary = DynamicsSummary(cfg.features.dynamics_dim, len(cfg.visual.summary_words)) \
            if cfg.summary_on else None
        self.audio = AudioEncoder(cfg.features, cfg.audio, cfg.time, time=ab.time) if ab.audio else None
        self.audio_proj = nn.Linear(self.audio.out_dim, hidden) if ab.audio else None
        self.llm = add_lora(llm, cfg.llm.lora)
        self.tokenizer = tokenizer
        base = self.llm.get_base_model() if hasattr(self.llm, "get_base_model") else self.llm
        self._keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters

    @classmethod
    def from_config(cls, cfg: MicroEmoConfig, device: torch.device | str | None = None) -> MicroEmo:
        """Build with the LLM ``cfg.llm`` names (loaded from local files, or random), on ``device``."""
        llm, tokenizer = load_llm(cfg.llm, device)
        return cls(cfg, llm, tokenizer).to(device)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def collator(self, train: bool = True) -> Collator:
        """Collation for this model's config and tokenizer (train=False: prompts only, for generate)."""
        return Collator(self.cfg, self.tokenizer, train=train)

    # ------------------------------------------------------------------ encoders
    def encode(self, batch: Batch) -> Encoded:
        video = video_mask = scores = on = None
        if self.visual is not None:
            video, video_mask, scores, on = self._encode_video(batch)
        audio = audio_mask = None
        if self.audio is not None:
            audio = self.audio_proj(self.audio(batch.audio_feat, batch.audio_span, batch.audio_mask))
            audio_mask = batch.audio_mask.any(1, keepdim=True).expand(-1, audio.shape[1])
        return Encoded(video, video_mask, audio, audio_mask, scores, on)

    def _encode_video(self, batch: Batch):
        frames = self.visual(batch.global_feat, batch.face_feat, batch.face_delta, batch.dynamics, batch.face_found,
                             batch.frame_pts, batch.frame_mask)
        video, video_mask = self.video(frames, batch.clip_frames, batch.seg_frames, batch.seg_mask)
        video = self.video_proj(video)  # (B, 1 + S, Nv, H)
        scores = on = None
        if self.video_summary is not None:  # one more token per window: a mixture of emotion words
            scores, on = self.video_summary(batch.dynamics, batch.face_found, batch.clip_frames, batch.seg_frames)
            words = scores.softmax(-1).to(video.dtype) @ self._word_embeddings().to(video.dtype)  # (B, 1 + S, H)
            video = torch.cat([video, words[:, :, None, :]], dim=2)
        nv = video.shape[2]
        video = video.flatten(1, 2)
        video_mask = video_mask[..., None].expand(-1, -1, nv).flatten(1)
        return video, video_mask, scores, on

    def _word_embeddings(self) -> torch.Tensor:
        """(K, H): each of ``visual.summary_words``' LLM input embedding (the mean over its tokens, the
        word written with a leading space as it appears in answers); frozen, read at every call."""
        if self.tokenizer is None:
            raise ValueError("the dynamics summary needs the model's tokenizer (build it with MicroEmo.from_config)")
        if getattr(self, "_word_ids", None) is None:
            self._word_ids = [self.tokenizer(" " + w, add_special_tokens=False).input_ids
                              for w in self.cfg.visual.summary_words]
        table = self.llm.get_input_embeddings()
        ids = [torch.tensor(x, dtype=torch.long, device=table.weight.device) for x in self._word_ids]
        return torch.stack([table(x).mean(0) for x in ids])

    def inputs_embeds(self, batch: Batch) -> torch.Tensor:
        """Prompt embeddings with placeholders replaced by projected tokens: (B, L, H) in the LLM's dtype."""
        return self._embed(batch)[0]

    def _embed(self, batch: Batch) -> tuple[torch.Tensor, Encoded]:
        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        enc = self.encode(batch)
        for kind, code, tokens, mask in (("video", VIDEO, enc.video, enc.video_mask),
                                         ("audio", AUDIO, enc.audio, enc.audio_mask)):
            if tokens is not None:
                embeds = _place(embeds, batch.mm_kind == code, tokens, mask, kind)
            elif (batch.mm_kind == code).any():
                raise ValueError(f"the batch has {kind} placeholders but the {kind} branch is off "
                                 "(collated with another config?)")
        return embeds, enc

    # ------------------------------------------------------------------ training
    def forward(self, batch: Batch) -> Output:
        """Loss on the answer tokens only (``batch.labels``; prompt, placeholders and padding are ignored)."""
        if batch.labels is None:
            raise ValueError("batch has no labels: collate with train=True")
        embeds, enc = self._embed(batch)
        labels = batch.labels
        length = labels.shape[1]
        answered = (labels != IGNORE).any(0).nonzero()
        if len(answered) == 0:
            raise ValueError("batch has no answer tokens")
        first = int(answered[0])
        extra = {}
        keep = length - first + 1  # left padding puts every answer at the end: logits for these only
        if self._keeps_logits:
            extra["logits_to_keep"] = keep
        out = self.llm(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                       position_ids=_positions(batch.attention_mask), use_cache=False, **extra)
        logits = out.logits[:, -keep:-1].float()
        target = labels[:, first:]
        if batch.loss_weights is None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE)
        else:  # weighted mean over answer tokens (prompt.label_weight on the label lines)
            per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                        ignore_index=IGNORE, reduction="none")
            w = (batch.loss_weights[:, first:].to(per_token.dtype) * (target != IGNORE)).reshape(-1)
            loss = (per_token * w).sum() / w.sum()
        summary_loss = self._summary_loss(enc, batch)
        if summary_loss is not None:
            loss = loss + self.cfg.visual.summary_loss * summary_loss
        return Output(loss=loss, answer_tokens=int((target != IGNORE).sum()), summary_loss=summary_loss)

    def _summary_loss(self, enc: Encoded, batch: Batch) -> torch.Tensor | None:
        """Cross-entropy of the clip windows' summary word scores against the clip's first label that is a
        summary word (``Batch.summary_targets``); None when no clip of the batch has one (or a face)."""
        if enc.summary_scores is None or batch.summary_targets is None or self.cfg.visual.summary_loss <= 0:
            return None
        target = batch.summary_targets.masked_fill(~enc.summary_on[:, 0], IGNORE)
        if not (target != IGNORE).any():
            return None
        return F.cross_entropy(enc.summary_scores[:, 0].float(), target, ignore_index=IGNORE)

    def set_stage(self, stage: int) -> list[tuple[str, nn.Parameter]]:
        """Set requires_grad for training stage 1 or 2; returns the trainable (name, parameter) pairs.

        Stage 1 (alignment): every parameter outside the LLM. Stage 2 (instruction tuning): those
        plus the LoRA adapter's. The LLM's own weights are never trained.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        trainable = []
        for name, p in self.named_parameters():
            on = not name.startswith("llm.") or (stage == 2 and "lora_" in name)
            p.requires_grad_(on)
            if on:
                trainable.append((name, p))
        if not trainable:
            raise ValueError(f"stage {stage} has nothing to train (video and audio branches off: train stage 2)")
        return trainable

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int | None = None, **kwargs) -> list[Answer]:
        """Answers for a prompt-only batch (``collator(train=False)``), greedy unless kwargs say otherwise.

        Returns one parsed ``Answer`` per clip; ``Answer.raw`` keeps the generated text. With
        ``llm.loop_ngram`` a row that starts repeating itself stops and the repeat is cut off; with
        ``llm.label_tokens`` an answer that has no ``Emotions:`` line gets one appended and the model
        continues from it (``Answer.forced``).
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer (build it with MicroEmo.from_config)")
        llm_cfg, tok = self.cfg.llm, self.tokenizer
        embeds = self.inputs_embeds(batch)
        kwargs.setdefault("do_sample", False)
        if llm_cfg.loop_ngram > 0:
            kwargs.setdefault("stopping_criteria", StoppingCriteriaList([_LoopStop(llm_cfg.loop_ngram)]))
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                max_new_tokens=max_new_tokens or llm_cfg.max_new_tokens,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kwargs)
        ids = [_answer_ids(row, tok, llm_cfg.loop_ngram) for row in out.tolist()]
        answers = [parse_answer(tok.decode(x, skip_special_tokens=True)) for x in ids]
        missing = [i for i, a in enumerate(answers) if not a.well_formed]
        if llm_cfg.label_tokens > 0 and missing:
            heads = [(a.raw.rstrip() + "\n" if a.raw.strip() else "") + "Emotions:" for a in (answers[i] for i in missing)]
            tails = self._continue(embeds[missing], batch.attention_mask[missing], heads, llm_cfg.label_tokens)
            for i, head, tail in zip(missing, heads, tails):
                answers[i] = parse_answer(head + tail)
                answers[i].well_formed, answers[i].forced = False, True
        return answers

    @torch.no_grad()
    def _continue(self, embeds: torch.Tensor, mask: torch.Tensor, heads: list[str], max_new_tokens: int) -> list[str]:
        """Greedy continuations of each prompt (``embeds`` with left-padding ``mask``) followed by ``heads[i]``."""
        tok, table = self.tokenizer, self.llm.get_input_embeddings()
        rows = []
        for e, m, head in zip(embeds, mask.bool(), heads):
            head_ids = torch.tensor(tok(head, add_special_tokens=False).input_ids, device=e.device, dtype=torch.long)
            rows.append(torch.cat([e[m], table(head_ids).to(e.dtype)]))
        length = max(len(r) for r in rows)
        padded = embeds.new_zeros(len(rows), length, embeds.shape[-1])
        new_mask = torch.zeros(len(rows), length, dtype=mask.dtype, device=mask.device)
        for i, r in enumerate(rows):
            padded[i, length - len(r):] = r
            new_mask[i, length - len(r):] = 1
        out = self.llm.generate(inputs_embeds=padded, attention_mask=new_mask, max_new_tokens=max_new_tokens,
                                do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return tok.batch_decode(out, skip_special_tokens=True)


class _LoopStop(StoppingCriteria):
    """Per row: done once its last ``n`` generated tokens equal an earlier ``n``-token run of the same row."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if input_ids.shape[1] <= self.n:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        windows = input_ids.unfold(1, self.n, 1)  # (B, L - n + 1, n)
        return (windows[:, :-1] == windows[:, -1:]).all(-1).any(-1)


def _answer_ids(row: list[int], tok, n: int) -> list[int]:
    """A generated row up to its end-of-turn (or padding), without the first repeat of an earlier
    ``n``-token run and everything after it (what ``_LoopStop`` stopped on)."""
    ends = [i for i, t in enumerate(row) if t in (tok.eos_token_id, tok.pad_token_id)]
    row = row[:ends[0]] if ends else row
    if n > 0:
        seen: set[tuple[int, ...]] = set()
        for end in range(n, len(row) + 1):
            window = tuple(row[end - n:end])
            if window in seen:
                return row[:end - n]
            seen.add(window)
    return row


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 at each row's first real token (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _place(embeds: torch.Tensor, where: torch.Tensor, tokens: torch.Tensor, valid: torch.Tensor,
           kind: str) -> torch.Tensor:
    """Write ``tokens[valid]`` (B, N, H) in order into the positions ``where`` (B, L) of ``embeds`` (B, L, H)."""
    want, have = where.sum(1), valid.sum(1)
    if not torch.equal(want, have):
        raise ValueError(f"{kind} placeholders per sample {want.tolist()} != {kind} tokens {have.tolist()} "
                         "(batch collated with another config?)")
    return embeds.masked_scatter(where[..., None], tokens[valid].to(embeds.dtype))


def count_parameters(cfg: MicroEmoConfig | str) -> dict[str, int]:
    """Parameter counts of a preset (or config) by component, built on the meta device (no weights, no files).

    The LLM is counted from the config's ``arch`` sizes (a loaded model of another family may differ
    slightly); LoRA from the shapes of its target layers. Keys: visual, video, audio, projections,
    llm, lora, stage1 (trainable in stage 1), stage2, total.
    """
    from transformers import AutoModelForCausalLM

    if isinstance(cfg, str):
        cfg = preset(cfg)
    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(llama_config(cfg.llm))
        model = MicroEmo(cfg, llm)

    def n(module: nn.Module | None) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    llm_total = sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" not in name)
    lora = sum(p.numel() for name, p in model.llm.named_parameters() if "lora_" in name)
    counts = {
        "visual": n(model.visual),
        "video": n(model.video),
        "audio": n(model.audio),
        "projections": n(model.video_proj) + n(model.video_summary) + n(model.audio_proj),
        "llm": llm_total,
        "lora": lora,
    }
    counts["stage1"] = counts["visual"] + counts["video"] + counts["audio"] + counts["projections"]
    counts["stage2"] = counts["stage1"] + lora
    counts["total"] = counts["stage1"] + llm_total + lora
    return counts
