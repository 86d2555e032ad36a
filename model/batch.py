"""Collation: feature-store samples -> one padded ``Batch`` of tensors and prompt token ids.

Input: the dicts ``jobs.data.iter_samples`` yields (see its docstring): per clip F frames,
U utterances and W audio windows, any of them varying between clips (F >= 1; U, W >= 0).

Output shapes (B clips; F, W, S, L the batch maxima)::

    frame_pts (B, F) s, frame_mask (B, F), global_feat (B, F, Tg, Dg), face_feat / face_delta (B, F, Df),
    dynamics (B, F, Dd), face_found (B, F)         padded frames: zeros, mask False
    audio_feat (B, W, Da), audio_span (B, W, 2) s, audio_mask (B, W)
    clip_frames (B, Mc) long                       frames read by the clip Q-Former, -1 = pad
    seg_frames (B, S, Ws, M) long, seg_mask (B, S) utterance segments' sub-windows' frames, -1 = pad
    input_ids, attention_mask, mm_kind (B, L)       left-padded prompt (+ answer when training)
    labels (B, L)                                  answer token ids, -100 elsewhere (loss on answers only)
    loss_weights (B, L) or None                    per-token loss weights (``prompt.label_weight`` on the
                                                   label lines, 1 elsewhere); None when that weight is 1

The prompt lives here (not in the model) because it depends on the data: how many segments
the clip gets decides how many video placeholders its prompt has.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import numpy as np
import torch

from model.config import MicroEmoConfig
from model.prompt import (TEXT, build_target, encode_prompt, label_spans, render_prompt, sorted_utterances,
                          user_message)
from model.video import Segment, clip_frames, plan_segments, select_by_time, window_frames

IGNORE = -100


@dataclass
class Batch:
    video_ids: list[str]
    frame_pts: torch.Tensor
    frame_mask: torch.Tensor
    global_feat: torch.Tensor
    face_feat: torch.Tensor
    face_delta: torch.Tensor
    dynamics: torch.Tensor
    face_found: torch.Tensor
    audio_feat: torch.Tensor
    audio_span: torch.Tensor
    audio_mask: torch.Tensor
    clip_frames: torch.Tensor
    seg_frames: torch.Tensor
    seg_mask: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    mm_kind: torch.Tensor
    labels: torch.Tensor | None
    prompts: list[str]
    targets: list[str] | None
    segments: list[list[Segment]]
    loss_weights: torch.Tensor | None = None
    summary_targets: torch.Tensor | None = None  # (B,) index into visual.summary_words of the clip's first
    # label among them, -100 if none (training, dynamics summary on)

    def to(self, device: torch.device | str) -> Batch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.video_ids)


def _pad(arrays: list[np.ndarray], tail: tuple[int, ...], length: int, dtype) -> torch.Tensor:
    """Arrays of shape (n_i, *tail) -> (len(arrays), length, *tail), zero-padded."""
    out = np.zeros((len(arrays), length, *tail), dtype=dtype)
    for i, a in enumerate(arrays):
        out[i, :len(a)] = a
    return torch.from_numpy(out)


def _pad_index(rows: list[list[int]], length: int) -> torch.Tensor:
    out = torch.full((len(rows), length), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _left_pad(seqs: list[list], fill, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Left padding: every row ends at the last position, so all answers end together."""
    length = max(len(x) for x in seqs)
    out = torch.full((len(seqs), length), fill, dtype=dtype)
    for i, x in enumerate(seqs):
        out[i, length - len(x):] = torch.tensor(x, dtype=dtype)
    return out


class Collator:
    """``Collator(cfg, tokenizer, train=True)(samples) -> Batch``.

    train=True appends the answer (``build_target``) and its end-of-turn token to each prompt
    and fills ``labels``; train=False gives prompts only (for ``generate``).
    """

    def __init__(self, cfg: MicroEmoConfig, tokenizer, train: bool = True):
        self.cfg = cfg
        self.tok = tokenizer
        self.train = train
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.forbidden = [t for t in tokenizer.all_special_tokens if t]

    def check(self, s: dict) -> None:
        """Raise ValueError naming the sample and field when a feature's shape disagrees with ``cfg.features``."""
        f = self.cfg.features
        vid = s.get("video_id")
        n = len(s["frame_pts"])
        if n == 0:
            raise ValueError(f"sample {vid!r}: no frames")
        expect = {"global_feat": (n, f.global_tokens, f.global_dim), "face_feat": (n, f.face_dim),
                  "face_delta": (n, f.face_dim), "dynamics": (n, f.dynamics_dim), "face_found": (n,),
                  "audio_feat": (None, f.audio_dim)}
        for key, want in expect.items():
            shape = tuple(np.shape(s[key]))
            if len(shape) != len(want) or any(w is not None and w != d for w, d in zip(want, shape)):
                shown = ", ".join("W" if w is None else str(w) for w in want)
                raise ValueError(f"sample {vid!r}: {key} has shape {shape}, config features expect ({shown})")

    def withholds_transcript(self, s: dict) -> bool:
        """Whether training collation withholds this sample's transcript (``prompt.transcript_dropout``):
        a stable hash of (video_id, epoch) against the rate, so every rank and a resumed run agree."""
        rate = self.cfg.prompt.transcript_dropout
        if not self.train or rate <= 0.0:
            return False
        key = f"{s.get('video_id')}:{int(s.get('epoch') or 0)}".encode()
        return zlib.crc32(key) / 2**32 < rate

    def audio_windows(self, s: dict) -> np.ndarray:
        """Indices of the audio windows used: all, or ``max_windows`` evenly in time; none with audio off."""
        span = np.asarray(s["audio_span"], np.float64).reshape(-1, 2)
        if not self.cfg.ablations.audio or len(span) == 0:
            return np.zeros(0, int)
        mid = span.mean(1)
        budget = self.cfg.audio.max_windows
        return np.asarray(select_by_time(np.arange(len(mid)), mid, float(mid.min()), float(mid.max()), budget), int)

    def tokens(self, s: dict, utterances: list[dict], segments: list[Segment], audio_idx: np.ndarray):
        """(prompt text, ids, position kinds, labels, loss weights, target text or None) for one sample."""
        cfg = self.cfg
        pts = np.asarray(s["frame_pts"], np.float64)
        duration = float(s.get("duration_s") or 0.0) or float(pts.max())
        span = np.asarray(s["audio_span"], np.float64).reshape(-1, 2)[audio_idx]
        audio_span = (float(span[:, 0].min()), float(span[:, 1].max())) if len(span) else None
        user = user_message(utterances, segments, duration, audio_span, cfg.window_tokens,
                            cfg.audio.qformer.queries, cfg.prompt, self.forbidden)
        prompt = render_prompt(self.tok, cfg.prompt.system, user)
        ids, kinds = encode_prompt(self.tok, prompt, placeholder_id=self.pad_id)
        labels = [IGNORE] * len(ids)
        weights = [1.0] * len(ids)
        target = None
        if self.train:
            target = build_target(s, cfg.prompt)
            answer = [*self.tok(target, add_special_tokens=False).input_ids, self.tok.eos_token_id]
            ids, kinds, labels = ids + answer, kinds + [TEXT] * len(answer), labels + answer
            weights += self.answer_weights(target, answer)
        if len(ids) > cfg.llm.max_positions:
            raise ValueError(f"sample {s.get('video_id')!r}: {len(ids)} tokens exceed the LLM's "
                             f"{cfg.llm.max_positions} positions")
        return prompt, ids, kinds, labels, weights, target

    def answer_weights(self, target: str, answer: list[int]) -> list[float]:
        """Loss weight per answer token: ``prompt.label_weight`` on the label lines (the ``Emotions:`` line,
        the utterance lines; ``model.prompt.label_spans``) and the end-of-turn token, 1 on the explanation.

        A character boundary maps to the token count of the text before it when those tokens are a prefix
        of the whole answer's tokens (a newline ends a pre-token in the BPE tokenizers we use); otherwise
        to the first token whose decoded prefix reaches it.
        """
        w = self.cfg.prompt.label_weight
        if w == 1.0:
            return [1.0] * len(answer)

        def token_at(char: int) -> int:
            if char >= len(target):
                return len(answer) - 1  # the end-of-turn token follows the text
            head = self.tok(target[:char], add_special_tokens=False).input_ids if char else []
            if answer[:len(head)] == head:
                return len(head)
            return next((k for k in range(len(answer) + 1)
                         if len(self.tok.decode(answer[:k], skip_special_tokens=True)) >= char), len(answer))

        weights = [1.0] * len(answer)
        for start, end in label_spans(target):
            for k in range(token_at(start), token_at(end)):
                weights[k] = w
        weights[-1] = w  # the end-of-turn token
        return weights

    def __call__(self, samples: list[dict]) -> Batch:
        cfg, fd = self.cfg, self.cfg.features
        for s in samples:
            self.check(s)
        frame_pts = [np.asarray(s["frame_pts"], np.float64) for s in samples]
        utterances = [sorted_utterances(s.get("utterances") or []) for s in samples]
        utterances = [[{**u, "text": ""} for u in utts] if self.withholds_transcript(s) else utts
                      for s, utts in zip(samples, utterances)]
        segments = [plan_segments([(float(u["start_s"]), float(u["end_s"])) for u in utts], pts, cfg.video)
                    if cfg.ablations.utterance and cfg.ablations.video else []
                    for utts, pts in zip(utterances, frame_pts)]
        windows = [[window_frames(pts, g, cfg.video) for g in segs] for segs, pts in zip(segments, frame_pts)]
        audio_idx = [self.audio_windows(s) for s in samples]

        b, f_max = len(samples), max(len(p) for p in frame_pts)
        s_max = max(len(g) for g in segments)
        sub_max = max([len(w) for ws in windows for w in ws] + [1])
        m_max = max([len(win) for ws in windows for w in ws for win in w] + [1])
        seg_frames = torch.full((b, s_max, sub_max, m_max), -1, dtype=torch.long)
        seg_mask = torch.zeros(b, s_max, dtype=torch.bool)
        for i, ws in enumerate(windows):
            seg_mask[i, :len(ws)] = True
            for j, w in enumerate(ws):
                seg_frames[i, j, :len(w)] = _pad_index(w, m_max)
        clips = [clip_frames(pts, cfg.video) for pts in frame_pts]

        encoded = [self.tokens(s, u, g, a) for s, u, g, a in zip(samples, utterances, segments, audio_idx)]
        prompts, ids, kinds, labels, weights, targets = (list(x) for x in zip(*encoded))
        input_ids = _left_pad(ids, self.pad_id)

        def feature(key: str, tail: tuple[int, ...], dtype=np.float32) -> torch.Tensor:
            return _pad([np.asarray(s[key], dtype) for s in samples], tail, f_max, dtype)

        w_max = max(len(a) for a in audio_idx)
        audio = [np.asarray(s["audio_feat"], np.float32).reshape(-1, fd.audio_dim)[a]
                 for s, a in zip(samples, audio_idx)]
        spans = [np.asarray(s["audio_span"], np.float32).reshape(-1, 2)[a] for s, a in zip(samples, audio_idx)]
        return Batch(
            video_ids=[str(s.get("video_id")) for s in samples],
            frame_pts=_pad([p.astype(np.float32) for p in frame_pts], (), f_max, np.float32),
            frame_mask=_pad([np.ones(len(p), bool) for p in frame_pts], (), f_max, bool),
            global_feat=feature("global_feat", (fd.global_tokens, fd.global_dim)),
            face_feat=feature("face_feat", (fd.face_dim,)),
            face_delta=feature("face_delta", (fd.face_dim,)),
            dynamics=feature("dynamics", (fd.dynamics_dim,)),
            face_found=feature("face_found", (), bool),
            audio_feat=_pad(audio, (fd.audio_dim,), w_max, np.float32),
            audio_span=_pad(spans, (2,), w_max, np.float32),
            audio_mask=_pad([np.ones(len(a), bool) for a in audio_idx], (), w_max, bool),
            clip_frames=_pad_index(clips, max(len(c) for c in clips)),
            seg_frames=seg_frames,
            seg_mask=seg_mask,
            input_ids=input_ids,
            attention_mask=_left_pad([[1] * len(x) for x in ids], 0),
            mm_kind=_left_pad(kinds, TEXT),
            labels=_left_pad(labels, IGNORE) if self.train else None,
            prompts=prompts,
            targets=targets if self.train else None,
            segments=segments,
            loss_weights=(_left_pad(weights, 0.0, torch.float32)
                          if self.train and cfg.prompt.label_weight != 1.0 else None),
            summary_targets=self.summary_targets(samples) if self.train and cfg.summary_on else None,
        )

    def summary_targets(self, samples: list[dict]) -> torch.Tensor:
        """(B,) the index in ``visual.summary_words`` of each clip's first label that is one, else -100."""
        words = {w.lower(): i for i, w in enumerate(self.cfg.visual.summary_words)}
        found = [next((words[x] for x in (str(v).strip().lower() for v in s.get("labels") or []) if x in words), IGNORE)
                 for s in samples]
        return torch.tensor(found, dtype=torch.long)
