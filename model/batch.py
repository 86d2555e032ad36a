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

The prompt lives here (not in the model) because it depends on the data: how many segments
the clip gets decides how many video placeholders its prompt has.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from model.config import MicroEmoConfig
from model.prompt import (TEXT, build_target, encode_prompt, render_prompt, sorted_utterances, user_message)
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

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device, non_blocking=True)
        return Batch(**moved)

    def __len__(self) -> int:
        return len(self.video_ids)


def _pad(arrays: list[np.ndarray], shape_tail: tuple[int, ...], length: int, dtype, fill=0) -> torch.Tensor:
    out = np.full((len(arrays), length, *shape_tail), fill, dtype=dtype)
    for i, a in enumerate(arrays):
        if len(a):
            out[i, :len(a)] = a
    return torch.from_numpy(out)


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

    def _check(self, s: dict) -> None:
        f = self.cfg.features
        vid = s.get("video_id")
        expect = {"global_feat": (f.global_tokens, f.global_dim), "face_feat": (f.face_dim,),
                  "face_delta": (f.face_dim,), "dynamics": (f.dynamics_dim,), "audio_feat": (f.audio_dim,)}
        n = len(s["frame_pts"])
        if n == 0:
            raise ValueError(f"sample {vid!r}: no frames")
        for key, tail in expect.items():
            shape = tuple(np.shape(s[key]))
            if shape[1:] != tail or (key != "audio_feat" and shape[0] != n):
                want = ("W" if key == "audio_feat" else str(n),) + tail
                raise ValueError(f"sample {vid!r}: {key} has shape {shape}, config features expect ({', '.join(map(str, want))})")

    def __call__(self, samples: list[dict]) -> Batch:
        cfg = self.cfg
        for s in samples:
            self._check(s)
        b = len(samples)
        f_max = max(len(s["frame_pts"]) for s in samples)
        fd = cfg.features

        # audio windows: at most max_windows per clip, chosen evenly in time
        audio_idx = []
        for s in samples:
            span = np.asarray(s["audio_span"], np.float64).reshape(-1, 2)
            if not cfg.ablations.audio or len(span) == 0:
                audio_idx.append(np.zeros(0, int))
                continue
            mid = span.mean(1)
            audio_idx.append(np.asarray(select_by_time(np.arange(len(mid)), mid, float(mid.min()), float(mid.max()),
                                                       cfg.audio.max_windows), int))
        w_max = max([len(i) for i in audio_idx] + [0])

        utterances = [sorted_utterances(s.get("utterances") or []) for s in samples]
        segments, seg_windows, clips = [], [], []
        for s, utts in zip(samples, utterances):
            pts = np.asarray(s["frame_pts"], np.float64)
            segs = plan_segments([(float(u["start_s"]), float(u["end_s"])) for u in utts], pts, cfg.video) \
                if cfg.ablations.utterance else []
            segments.append(segs)
            seg_windows.append([window_frames(pts, g, cfg.video) for g in segs])
            clips.append(clip_frames(pts, cfg.video))
        s_max = max(len(g) for g in segments)
        ws_max = max([len(ws_seg) for ws in seg_windows for ws_seg in ws] + [1])
        m_max = max([len(win) for ws in seg_windows for ws_seg in ws for win in ws_seg] + [1])
        seg_frames = torch.full((b, s_max, ws_max, m_max), -1, dtype=torch.long)
        seg_mask = torch.zeros(b, s_max, dtype=torch.bool)
        for i, ws in enumerate(seg_windows):
            for j, ws_seg in enumerate(ws):
                seg_mask[i, j] = True
                for k, win in enumerate(ws_seg):
                    seg_frames[i, j, k, :len(win)] = torch.tensor(win)
        mc_max = max(len(c) for c in clips)
        clip_idx = torch.full((b, mc_max), -1, dtype=torch.long)
        for i, c in enumerate(clips):
            clip_idx[i, :len(c)] = torch.tensor(c)

        # prompts (+ answers)
        n_video = cfg.video.clip_qformer.queries
        n_audio = cfg.audio.qformer.queries
        placeholder_id = self.pad_id
        seqs, kinds, label_seqs, prompts, targets = [], [], [], [], []
        for s, utts, segs, aidx in zip(samples, utterances, segments, audio_idx):
            pts = np.asarray(s["frame_pts"], np.float64)
            duration = float(s.get("duration_s") or 0.0) or float(pts.max())
            span = np.asarray(s["audio_span"], np.float64).reshape(-1, 2)
            audio_span = (float(span[aidx, 0].min()), float(span[aidx, 1].max())) if len(aidx) else None
            user = user_message(utts, segs, duration, audio_span, n_video, n_audio, cfg.prompt, self.forbidden)
            prompt = render_prompt(self.tok, cfg.prompt.system, user)
            ids, kind = encode_prompt(self.tok, prompt, placeholder_id)
            labels = [IGNORE] * len(ids)
            if self.train:
                target = build_target(s, cfg.prompt)
                answer = self.tok(target, add_special_tokens=False).input_ids + [self.tok.eos_token_id]
                ids, kind, labels = ids + answer, kind + [TEXT] * len(answer), labels + answer
                targets.append(target)
            if len(ids) > cfg.llm.max_positions:
                raise ValueError(f"sample {s.get('video_id')!r}: {len(ids)} tokens exceed the LLM's "
                                 f"{cfg.llm.max_positions} positions")
            seqs.append(ids)
            kinds.append(kind)
            label_seqs.append(labels)
            prompts.append(prompt)
        length = max(len(x) for x in seqs)
        input_ids = torch.full((b, length), self.pad_id, dtype=torch.long)
        attention = torch.zeros(b, length, dtype=torch.long)
        mm_kind = torch.full((b, length), TEXT, dtype=torch.long)
        labels = torch.full((b, length), IGNORE, dtype=torch.long)
        for i, (ids, kind, lab) in enumerate(zip(seqs, kinds, label_seqs)):
            n = len(ids)  # left padding: every answer ends at the last position
            input_ids[i, length - n:] = torch.tensor(ids)
            attention[i, length - n:] = 1
            mm_kind[i, length - n:] = torch.tensor(kind)
            labels[i, length - n:] = torch.tensor(lab)

        frame_pts = [np.asarray(s["frame_pts"], np.float32) for s in samples]
        return Batch(
            video_ids=[str(s.get("video_id")) for s in samples],
            frame_pts=_pad(frame_pts, (), f_max, np.float32),
            frame_mask=_pad([np.ones(len(p), bool) for p in frame_pts], (), f_max, bool),
            global_feat=_pad([np.asarray(s["global_feat"], np.float32) for s in samples],
                             (fd.global_tokens, fd.global_dim), f_max, np.float32),
            face_feat=_pad([np.asarray(s["face_feat"], np.float32) for s in samples], (fd.face_dim,), f_max, np.float32),
            face_delta=_pad([np.asarray(s["face_delta"], np.float32) for s in samples], (fd.face_dim,), f_max,
                            np.float32),
            dynamics=_pad([np.asarray(s["dynamics"], np.float32) for s in samples], (fd.dynamics_dim,), f_max,
                          np.float32),
            face_found=_pad([np.asarray(s["face_found"], bool) for s in samples], (), f_max, bool),
            audio_feat=_pad([np.asarray(s["audio_feat"], np.float32).reshape(-1, fd.audio_dim)[i]
                             for s, i in zip(samples, audio_idx)], (fd.audio_dim,), w_max, np.float32),
            audio_span=_pad([np.asarray(s["audio_span"], np.float32).reshape(-1, 2)[i] for s, i in zip(samples, audio_idx)],
                            (2,), w_max, np.float32),
            audio_mask=_pad([np.ones(len(i), bool) for i in audio_idx], (), w_max, bool),
            clip_frames=clip_idx,
            seg_frames=seg_frames,
            seg_mask=seg_mask,
            input_ids=input_ids,
            attention_mask=attention,
            mm_kind=mm_kind,
            labels=labels if self.train else None,
            prompts=prompts,
            targets=targets if self.train else None,
            segments=segments,
        )
