"""Feature-store samples for training and evaluation: one video = one sample, streamed.

``iter_samples(store)`` walks the store shard by shard (a shard holds a handful of videos),
so memory holds one shard's rows at a time however large the store is. Only videos whose
``videos`` row has status ``ok`` (or ``no_face`` / ``no_audio``, which still have usable rows)
are yielded.

A sample is a plain dict of numpy arrays and Python values (the model's collate turns a list
of them into padded tensors)::

    video_id      str
    duration_s    float
    split         str | None
    frame_pts     (F,) float32 seconds
    global_feat   (F, Tg, Dg) float32     whole-frame tokens
    face_found    (F,) bool
    face_feat     (F, Df) float32          zeros where no face
    face_delta    (F, Df) float32
    dynamics      (F, Dd) float32          zeros where no face
    audio_feat    (W, Da) float32          audio windows (W may be 0)
    audio_span    (W, 2) float32           start_s, end_s
    utterances    list of {start_s, end_s, text, speaker}
    labels        list[str]
    description   str | None
    utterance_labels  list of {start_s, end_s, labels}
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.store import FeatureStore

USABLE = ("ok", "no_face", "no_audio")


def _field_shape(schema: pa.Schema, name: str) -> tuple[int, int]:
    meta = schema.field(name).metadata or {}
    return int(meta.get(b"tokens", b"1")), int(meta[b"dim"])


def _stack(values, shape: tuple[int, ...], n: int) -> np.ndarray:
    out = np.zeros((n, *shape), np.float32)
    for i, v in enumerate(values):
        if v is not None:
            out[i] = np.asarray(v, np.float32).reshape(shape)
    return out


def iter_samples(store: str | FeatureStore, split: str | None = None, video_ids: set[str] | None = None,
                 storage_options: dict | None = None) -> Iterator[dict]:
    """Samples of a store, shard by shard, in shard then video order."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, storage_options)
    for shard in fs.shards("videos"):
        videos = fs.read_table("videos", shards=[shard]).to_pylist()
        wanted = [v for v in videos if v["status"] in USABLE and (video_ids is None or v["video_id"] in video_ids)]
        if not wanted:
            continue
        tables = {name: fs.read_table(name, shards=[shard]) for name in ("frames", "utterances", "audio", "labels")}
        labels = {r["video_id"]: r for r in tables["labels"].to_pylist()} if tables["labels"].num_rows else {}
        if split is not None:
            wanted = [v for v in wanted if labels.get(v["video_id"], {}).get("split") == split]
        frames = tables["frames"]
        g_shape = _field_shape(frames.schema, "global_feat")
        f_dim = _field_shape(frames.schema, "face_feat")[1]
        d_dim = _field_shape(frames.schema, "dynamics")[1]
        a_dim = _field_shape(tables["audio"].schema, "audio_feat")[1]
        by_video = {name: _group(t) for name, t in tables.items() if name != "labels"}
        for v in wanted:
            vid = v["video_id"]
            fr = sorted(by_video["frames"].get(vid, []), key=lambda r: r["frame_index"])
            au = sorted(by_video["audio"].get(vid, []), key=lambda r: r["window_index"])
            ut = sorted(by_video["utterances"].get(vid, []), key=lambda r: r["utt_index"])
            lab = labels.get(vid, {})
            n = len(fr)
            yield {
                "video_id": vid,
                "duration_s": float(v["duration_s"] or 0.0),
                "split": lab.get("split"),
                "frame_pts": np.array([r["pts_s"] for r in fr], np.float32),
                "global_feat": _stack([r["global_feat"] for r in fr], g_shape, n),
                "face_found": np.array([bool(r["face_found"]) for r in fr], bool),
                "face_feat": _stack([r["face_feat"] for r in fr], (f_dim,), n),
                "face_delta": _stack([r["face_feat_delta"] for r in fr], (f_dim,), n),
                "dynamics": _stack([r["dynamics"] for r in fr], (d_dim,), n),
                "audio_feat": _stack([r["audio_feat"] for r in au], (a_dim,), len(au)),
                "audio_span": np.array([[r["start_s"], r["end_s"]] for r in au], np.float32).reshape(-1, 2),
                "utterances": [{k: r[k] for k in ("start_s", "end_s", "text", "speaker")} for r in ut],
                "labels": list(lab.get("labels") or []),
                "description": lab.get("description"),
                "utterance_labels": list(lab.get("utterance_labels") or []),
            }


def _group(table: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        out.setdefault(r["video_id"], []).append(r)
    return out
