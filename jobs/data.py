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
    motion_energy (F,) float32             peak whole-face motion around each frame (0 where no face)
    motion_peak_offset_s (F,) float32      when that peak happens, relative to frame_pts
    audio_feat    (W, Da) float32          audio windows (W may be 0)
    audio_span    (W, 2) float32           start_s, end_s
    utterances    list of {start_s, end_s, text, speaker}
    labels        list[str]
    description   str | None
    utterance_labels  list of {start_s, end_s, labels}
    epoch         int                      SampleStream only: the pass over the data it belongs to
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.store import FeatureStore, fixed_size_rows

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
                 storage_options: dict | None = None, shards: list[str] | None = None) -> Iterator[dict]:
    """Samples of a store (or of the given shards), shard by shard, in shard then video order."""
    fs = store if isinstance(store, FeatureStore) else FeatureStore(store, storage_options)
    for shard in (shards if shards is not None else fs.shards("videos")):
        videos = fs.read_table("videos", shards=[shard]).to_pylist()
        wanted = [v for v in videos if v["status"] in USABLE and (video_ids is None or v["video_id"] in video_ids)]
        if not wanted:
            continue
        tables = {name: fs.read_table(name, shards=[shard]) for name in ("frames", "utterances", "audio", "labels")}
        labels = {r["video_id"]: r for r in tables["labels"].to_pylist()} if tables["labels"].num_rows else {}
        if split is not None:
            wanted = [v for v in wanted if labels.get(v["video_id"], {}).get("split") == split]
        if not wanted:
            continue
        shapes = {"global": _field_shape(tables["frames"].schema, "global_feat"),
                  "face": _field_shape(tables["frames"].schema, "face_feat")[1],
                  "dynamics": _field_shape(tables["frames"].schema, "dynamics")[1],
                  "audio": _field_shape(tables["audio"].schema, "audio_feat")[1]}
        ids = [v["video_id"] for v in wanted]
        frames, audio = _columns(tables["frames"], ids, "frame_index"), _columns(tables["audio"], ids, "window_index")
        utterances = _group(_only(tables["utterances"], ids))
        for v in wanted:
            vid = v["video_id"]
            yield _sample(v, frames.get(vid), audio.get(vid), utterances.get(vid, []), labels.get(vid), shapes)


def _only(table: pa.Table, ids: list[str]) -> pa.Table:
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table["video_id"], value_set=pa.array(ids, pa.string())))


def _columns(table: pa.Table, ids: list[str], order: str) -> dict[str, dict[str, np.ndarray]]:
    """{video_id: {column: numpy array}} for the rows of ``ids``, each video's rows sorted by ``order``.

    Vectorised (Arrow -> numpy), never row dicts: a shard's frames hold thousands of float16
    values per row, and turning them into Python lists cost most of the data thread's time.
    Fixed-size list columns become (rows, dim) float32 with zeros where the value is null.
    """
    table = _only(table, ids).sort_by([("video_id", "ascending"), (order, "ascending")])
    if table.num_rows == 0:
        return {}
    cols: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table[name].combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            cols[name] = fixed_size_rows(col).astype(np.float32, copy=False)
        elif pa.types.is_floating(col.type) or pa.types.is_integer(col.type) or pa.types.is_boolean(col.type):
            cols[name] = col.to_numpy(zero_copy_only=False)
        elif name == "video_id":
            cols[name] = np.asarray(col.to_pylist(), dtype=object)
    vids = cols["video_id"]
    starts = np.flatnonzero(np.r_[True, vids[1:] != vids[:-1]])
    ends = np.r_[starts[1:], len(vids)]
    return {vids[a]: {k: v[a:b] for k, v in cols.items()} for a, b in zip(starts, ends)}


def _sample(video: dict, fr: dict | None, au: dict | None, utterances: list[dict], label: dict | None,
            shapes: dict) -> dict:
    """``assemble`` from ``_columns`` output (same sample, built from arrays)."""
    n, w = (len(fr["pts_s"]) if fr else 0), (len(au["start_s"]) if au else 0)
    found = np.array([bool(x) for x in fr["face_found"]], bool) if fr else np.zeros(0, bool)  # nulls -> False

    def vec(key: str, shape: tuple[int, ...]) -> np.ndarray:
        return (fr[key].reshape(n, *shape).astype(np.float32) if fr and key in fr
                else np.zeros((n, *shape), np.float32))

    def scalar(key: str) -> np.ndarray:
        return np.nan_to_num(fr[key].astype(np.float32)) if fr and key in fr else np.zeros(n, np.float32)

    lab = label or {}
    return {
        "video_id": video["video_id"],
        "duration_s": float(video.get("duration_s") or 0.0),
        "split": lab.get("split"),
        "frame_pts": (fr["pts_s"] if fr else np.zeros(0)).astype(np.float32),
        "global_feat": vec("global_feat", shapes["global"]),
        "face_found": found,
        "face_feat": vec("face_feat", (shapes["face"],)),
        "face_delta": vec("face_feat_delta", (shapes["face"],)),
        "dynamics": vec("dynamics", (shapes["dynamics"],)),
        "motion_energy": scalar("motion_energy"),
        "motion_peak_offset_s": scalar("motion_peak_offset_s"),
        "audio_feat": (au["audio_feat"].reshape(w, shapes["audio"]).astype(np.float32) if au
                       else np.zeros((0, shapes["audio"]), np.float32)),
        "audio_span": (np.stack([au["start_s"], au["end_s"]], 1).astype(np.float32) if au
                       else np.zeros((0, 2), np.float32)),
        "utterances": [{k: r.get(k) for k in ("start_s", "end_s", "text", "speaker")}
                       for r in sorted(utterances, key=lambda r: r["utt_index"])],
        "labels": list(lab.get("labels") or []),
        "description": lab.get("description"),
        "utterance_labels": list(lab.get("utterance_labels") or []),
    }


def assemble(video: dict, frames: list[dict], audio: list[dict], utterances: list[dict], label: dict | None,
             shapes: dict) -> dict:
    """One sample from one video's rows (store rows, or ``VideoProcessor.process`` output).

    shapes: {"global": (tokens, dim), "face": dim, "dynamics": dim, "audio": dim}.
    """
    fr = sorted(frames, key=lambda r: r["frame_index"])
    au = sorted(audio, key=lambda r: r["window_index"])
    ut = sorted(utterances, key=lambda r: r["utt_index"])
    lab = label or {}
    n = len(fr)
    return {
        "video_id": video["video_id"],
        "duration_s": float(video.get("duration_s") or 0.0),
        "split": lab.get("split"),
        "frame_pts": np.array([r["pts_s"] for r in fr], np.float32),
        "global_feat": _stack([r.get("global_feat") for r in fr], shapes["global"], n),
        "face_found": np.array([bool(r["face_found"]) for r in fr], bool),
        "face_feat": _stack([r.get("face_feat") for r in fr], (shapes["face"],), n),
        "face_delta": _stack([r.get("face_feat_delta") for r in fr], (shapes["face"],), n),
        "dynamics": _stack([r.get("dynamics") for r in fr], (shapes["dynamics"],), n),
        "motion_energy": np.array([r.get("motion_energy") or 0.0 for r in fr], np.float32),
        "motion_peak_offset_s": np.array([r.get("motion_peak_offset_s") or 0.0 for r in fr], np.float32),
        "audio_feat": _stack([r["audio_feat"] for r in au], (shapes["audio"],), len(au)),
        "audio_span": np.array([[r["start_s"], r["end_s"]] for r in au], np.float32).reshape(-1, 2),
        "utterances": [{k: r.get(k) for k in ("start_s", "end_s", "text", "speaker")} for r in ut],
        "labels": list(lab.get("labels") or []),
        "description": lab.get("description"),
        "utterance_labels": list(lab.get("utterance_labels") or []),
    }


def _group(table: pa.Table) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in table.to_pylist():
        out.setdefault(r["video_id"], []).append(r)
    return out


# ---------------------------------------------------------------------------- training stream

REQUIRED_COLUMNS = {
    "videos": ("video_id", "status", "duration_s"),
    "frames": ("video_id", "frame_index", "pts_s", "global_feat", "face_found", "face_feat", "face_feat_delta",
               "dynamics"),
    "utterances": ("video_id", "utt_index", "start_s", "end_s", "text"),
    "audio": ("video_id", "window_index", "start_s", "end_s", "audio_feat"),
    "labels": ("video_id", "split", "labels", "description", "utterance_labels"),
}


class StoreSchemaError(ValueError):
    """The feature store lacks a table or column training needs; the message names it."""


def check_store(store: FeatureStore) -> None:
    """Fail fast, naming the table and column, when a store cannot feed training."""
    import pyarrow.parquet as pq

    for table, columns in REQUIRED_COLUMNS.items():
        shards = store.shards(table)
        if not shards:
            raise StoreSchemaError(f"{store.url}: table {table}/ is missing or empty")
        with store.fs.open(store.path(table, f"part-{shards[0]}.parquet"), "rb") as f:
            schema = pq.read_schema(f)
        for col in columns:
            if col not in schema.names:
                raise StoreSchemaError(f"{store.url}: table {table}/ has no column {col!r}")
    for col in ("global_feat", "face_feat", "dynamics"):
        with store.fs.open(store.path("frames", f"part-{store.shards('frames')[0]}.parquet"), "rb") as f:
            meta = pq.read_schema(f).field(col).metadata or {}
        if b"dim" not in meta:
            raise StoreSchemaError(f"{store.url}: frames/{col} has no 'dim' metadata (not written by microemo preprocess?)")


def video_index(store: FeatureStore, split: str | None = None) -> list[tuple[str, str]]:
    """(shard, video_id) of every usable video (in ``split`` when given), sorted."""
    out = []
    for shard in store.shards("videos"):
        videos = store.read_table("videos", shards=[shard], columns=["video_id", "status"]).to_pylist()
        splits = {}
        if split is not None:
            labels = store.read_table("labels", shards=[shard], columns=["video_id", "split"]).to_pylist()
            splits = {r["video_id"]: r["split"] for r in labels}
        for v in videos:
            if v["status"] in USABLE and (split is None or splits.get(v["video_id"]) == split):
                out.append((shard, v["video_id"]))
    return sorted(out)


class SampleStream:
    """This rank's samples for one epoch, in a seeded order, resumable at any position.

    Order: shards are shuffled with (seed, epoch), then videos are shuffled within windows of
    ``window`` shards, so reading stays shard-local (at most one shard's rows in memory) while
    the order still mixes shards. Rank r of w takes every w-th sample from offset r; the stream
    is cut to the same length on every rank (DeepSpeed needs equal step counts). ``position``
    is how many samples this rank has consumed; ``start`` skips that many without reading them.
    """

    def __init__(self, store: FeatureStore, split: str | None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 epoch: int = 0, start: int = 0, window: int = 4):
        import random

        index = video_index(store, split)
        by_shard: dict[str, list[str]] = {}
        for shard, vid in index:
            by_shard.setdefault(shard, []).append(vid)
        rng = random.Random(f"{seed}:{epoch}")
        shards = sorted(by_shard)
        rng.shuffle(shards)
        order: list[tuple[str, str]] = []
        for i in range(0, len(shards), window):
            block = [(s, v) for s in shards[i: i + window] for v in by_shard[s]]
            rng.shuffle(block)
            order.extend(block)
        per_rank = len(order) // world_size
        self.items = order[rank::world_size][:per_rank]
        self.store, self.position, self.window, self.epoch = store, start, window, epoch

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[dict]:
        from collections import OrderedDict

        # the window interleaves up to `window` shards: keep that many shards' samples (LRU)
        cache: OrderedDict[str, dict[str, dict]] = OrderedDict()
        while self.position < len(self.items):
            shard, vid = self.items[self.position]
            if shard not in cache:
                if len(cache) >= self.window:
                    cache.popitem(last=False)
                wanted = {v for s, v in self.items[self.position:] if s == shard}
                cache[shard] = {x["video_id"]: x for x in iter_samples(self.store, video_ids=wanted, shards=[shard])}
            cache.move_to_end(shard)
            sample = cache[shard][vid]
            self.position += 1
            yield {**sample, "epoch": self.epoch}  # the collator's per-epoch draws (prompt.transcript_dropout)
