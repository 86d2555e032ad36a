"""The Parquet feature store: schemas, atomic shard commits, resume state and lineage.

A store is a directory or prefix (local path or any fsspec URL, e.g. ``s3://bucket/fs``)::

    videos/part-<shard>.parquet       one row per input video (status, errors, timings)
    frames/part-<shard>.parquet       one row per sampled frame
    utterances/part-<shard>.parquet   one row per utterance
    audio/part-<shard>.parquet        one row per audio window
    labels/part-<shard>.parquet       one row per labelled video
    _lineage.json                     pipeline version, encoders, resolved config, counts, runs
    _staging/<shard>/                 shards being written (never read by consumers)

A shard holds the rows of a batch of videos, sorted by ``video_id``, one row group per
video. Commit protocol: every table file of the shard is written under ``_staging/<shard>/``,
then a ``READY`` marker, then the files are moved into the tables, ``videos`` last; a shard's
rows therefore become visible together, and the ``videos`` table only ever names videos whose
rows are all in place. A crash leaves either an unfinished staging folder (deleted on the
next run) or a READY one (its moves are completed on the next run).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dynamics import VERSION as DYNAMICS_VERSION

TABLES = ("labels", "utterances", "audio", "frames", "videos")  # commit order: videos last
PIPELINE_VERSION = "preprocess-2"  # 2: dynamics gained the signed geometry block


def _f16_list(dim: int) -> pa.DataType:
    return pa.list_(pa.float16(), dim)


def schemas(dims: dict[str, tuple[int, int]], encoder_ids: dict[str, str], dyn_dim: int) -> dict[str, pa.Schema]:
    """Arrow schemas of the tables. ``dims`` maps frame/face/audio to (tokens, dim)."""
    gt, gd = dims["frame"]
    ft, fd = dims["face"]
    at, ad = dims["audio"]

    def feat(name: str, kind: str, tokens: int, dim: int) -> pa.Field:
        meta = {"encoder": encoder_ids[kind], "tokens": str(tokens), "dim": str(dim), "layout": "tokens x dim, row-major"}
        return pa.field(name, _f16_list(tokens * dim), metadata=meta)

    return {
        "videos": pa.schema([
            ("video_id", pa.string()), ("uri", pa.string()), ("status", pa.string()),
            ("error_type", pa.string()), ("error", pa.string()), ("manifest_line", pa.int32()),
            ("content_hash", pa.string()), ("source_fingerprint", pa.string()), ("config_hash", pa.string()),
            ("size_bytes", pa.int64()), ("duration_s", pa.float64()), ("fps", pa.float64()),
            ("width", pa.int32()), ("height", pa.int32()), ("has_audio", pa.bool_()),
            ("n_frames", pa.int32()), ("n_faces", pa.int32()), ("n_utterances", pa.int32()),
            ("n_audio_windows", pa.int32()), ("utterance_source", pa.string()),
            ("t_fetch_s", pa.float64()), ("t_decode_s", pa.float64()), ("t_faces_s", pa.float64()),
            ("t_encode_s", pa.float64()), ("t_audio_s", pa.float64()), ("t_total_s", pa.float64()),
            ("shard", pa.string()), ("processed_at", pa.timestamp("ms", tz="UTC")),
            ("pipeline_version", pa.string()),
        ]),
        "frames": pa.schema([
            ("video_id", pa.string()), ("frame_index", pa.int32()), ("pts_s", pa.float64()),
            feat("global_feat", "frame", gt, gd),
            ("face_found", pa.bool_()), ("track_id", pa.int32()),
            ("bbox", pa.list_(pa.float32(), 4)), ("face_score", pa.float32()),
            ("landmarks", pa.list_(pa.float32(), 136)),
            feat("face_feat", "face", ft, fd), feat("face_feat_delta", "face", ft, fd),
            pa.field("dynamics", _f16_list(dyn_dim), metadata={"encoder": DYNAMICS_VERSION, "dim": str(dyn_dim)}),
            ("motion_energy", pa.float32()), ("motion_peak_offset_s", pa.float32()),
        ]),
        "utterances": pa.schema([
            ("video_id", pa.string()), ("utt_index", pa.int32()), ("start_s", pa.float64()),
            ("end_s", pa.float64()), ("text", pa.string()), ("speaker", pa.string()), ("source", pa.string()),
        ]),
        "audio": pa.schema([
            ("video_id", pa.string()), ("window_index", pa.int32()), ("start_s", pa.float64()),
            ("end_s", pa.float64()), feat("audio_feat", "audio", at, ad),
        ]),
        "labels": pa.schema([
            ("video_id", pa.string()), ("split", pa.string()), ("labels", pa.list_(pa.string())),
            ("description", pa.string()),
            ("utterance_labels", pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64()),
                                                      ("labels", pa.list_(pa.string()))]))),
        ]),
    }


def f16(x: np.ndarray | None) -> list | None:
    """A feature array as the flat float16 list a fixed-size list column holds (None stays None)."""
    if x is None:
        return None
    return np.asarray(x, np.float16).ravel()


class FeatureStore:
    """Reads and writes one store. ``root`` is a local path or fsspec URL."""

    def __init__(self, root: str, storage_options: dict | None = None):
        import fsspec

        self.url = root.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = self.root.rstrip("/")

    # ------------------------------------------------------------------ paths
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _ls(self, folder: str) -> list[str]:
        try:
            return [p for p in self.fs.ls(self.path(folder), detail=False)]
        except FileNotFoundError:
            return []

    def shards(self, table: str = "videos") -> list[str]:
        """Shard names present in a table."""
        out = []
        for p in self._ls(table):
            name = posixpath.basename(p)
            if name.startswith("part-") and name.endswith(".parquet"):
                out.append(name[len("part-"):-len(".parquet")])
        return sorted(out)

    # ------------------------------------------------------------------ writing
    @staticmethod
    def new_shard_name() -> str:
        return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:10]}"

    def write_shard(self, shard: str, tables: dict[str, pa.Table]) -> None:
        """Stage every table of the shard, mark it READY, then move it into place (videos last)."""
        staging = self.path("_staging", shard)
        self.fs.makedirs(staging, exist_ok=True)
        for name in TABLES:
            table = tables[name]
            with self.fs.open(posixpath.join(staging, f"{name}.parquet"), "wb") as f:
                _write_clustered(table, f)
        with self.fs.open(posixpath.join(staging, "READY"), "wb") as f:
            f.write(json.dumps({"tables": list(TABLES), "rows": {k: tables[k].num_rows for k in TABLES}}).encode())
        self._finish(shard)

    def _finish(self, shard: str) -> None:
        staging = self.path("_staging", shard)
        for name in TABLES:
            src = posixpath.join(staging, f"{name}.parquet")
            if self.fs.exists(src):
                self.fs.makedirs(self.path(name), exist_ok=True)
                dst = self.path(name, f"part-{shard}.parquet")
                if self.fs.exists(dst):  # a rewrite of this shard: replace it
                    self.fs.rm(dst)
                self.fs.mv(src, dst)
        self.fs.rm(staging, recursive=True)

    def recover(self) -> dict[str, int]:
        """Finish READY staged shards, drop unfinished ones and orphan data files; returns counts."""
        finished = dropped = orphans = 0
        for p in self._ls("_staging"):
            shard = posixpath.basename(p.rstrip("/"))
            if self.fs.exists(posixpath.join(p, "READY")):
                self._finish(shard)
                finished += 1
            else:
                self.fs.rm(p, recursive=True)
                dropped += 1
        committed = set(self.shards("videos"))
        for name in TABLES[:-1]:
            for shard in self.shards(name):
                if shard not in committed:
                    self.fs.rm(self.path(name, f"part-{shard}.parquet"))
                    orphans += 1
        return {"finished": finished, "dropped": dropped, "orphans": orphans}

    def drop_videos(self, shard: str, video_ids: set[str]) -> None:
        """Remove videos' rows from a committed shard (rewritten through staging, or deleted when empty)."""
        import pyarrow.compute as pc

        drop = pa.array(sorted(video_ids), pa.string())
        tables = {name: self.read_table(name, shards=[shard]) for name in TABLES}
        kept = {name: t.filter(pc.invert(pc.is_in(t["video_id"], value_set=drop))) for name, t in tables.items()}
        if kept["videos"].num_rows == 0:
            self.fs.rm(self.path("videos", f"part-{shard}.parquet"))  # videos first: others become orphans
            for name in TABLES[:-1]:
                p = self.path(name, f"part-{shard}.parquet")
                if self.fs.exists(p):
                    self.fs.rm(p)
            return
        self.write_shard(shard, kept)

    def clear(self) -> None:
        """Remove every table, staging folder and the lineage file (``--overwrite``)."""
        for name in (*TABLES, "_staging"):
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        if self.fs.exists(self.path("_lineage.json")):
            self.fs.rm(self.path("_lineage.json"))

    # ------------------------------------------------------------------ reading
    def read_table(self, name: str, shards: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
        names = shards if shards is not None else self.shards(name)
        parts = []
        for shard in names:
            p = self.path(name, f"part-{shard}.parquet")
            if self.fs.exists(p):
                with self.fs.open(p, "rb") as f:
                    parts.append(pq.read_table(f, columns=columns))
        if not parts:
            return pa.table({})
        return pa.concat_tables(parts, promote_options="default")

    def committed(self) -> dict[str, dict]:
        """video_id -> its videos-table row (status, fingerprints, shard) for every committed video."""
        t = self.read_table("videos", columns=["video_id", "status", "error_type", "source_fingerprint",
                                                "config_hash", "shard", "n_frames"])
        return {r["video_id"]: r for r in t.to_pylist()} if t.num_rows else {}

    # ------------------------------------------------------------------ lineage
    def read_lineage(self) -> dict[str, Any]:
        p = self.path("_lineage.json")
        if not self.fs.exists(p):
            return {}
        with self.fs.open(p, "rb") as f:
            return json.loads(f.read())

    def write_lineage(self, lineage: dict[str, Any]) -> None:
        tmp = self.path("_lineage.json.part")
        with self.fs.open(tmp, "wb") as f:
            f.write(json.dumps(lineage, indent=1, default=str).encode())
        if self.fs.exists(self.path("_lineage.json")):
            self.fs.rm(self.path("_lineage.json"))
        self.fs.mv(tmp, self.path("_lineage.json"))


def _write_clustered(table: pa.Table, f) -> None:
    """Rows sorted by video_id (then their index), one row group per video."""
    if table.num_rows == 0:
        pq.write_table(table, f)
        return
    keys = [("video_id", "ascending")]
    for col in ("frame_index", "utt_index", "window_index"):
        if col in table.column_names:
            keys.append((col, "ascending"))
    table = table.sort_by(keys)
    ids = table["video_id"].to_pylist()
    with pq.ParquetWriter(f, table.schema, compression="zstd") as writer:
        start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or ids[i] != ids[start]:
                writer.write_table(table.slice(start, i - start))
                start = i


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class ShardRows:
    """Rows of one shard, accumulated per table before writing."""

    videos: list[dict]
    frames: list[dict]
    utterances: list[dict]
    audio: list[dict]
    labels: list[dict]

    @classmethod
    def empty(cls) -> "ShardRows":
        return cls([], [], [], [], [])

    def to_tables(self, table_schemas: dict[str, pa.Schema]) -> dict[str, pa.Table]:
        return {name: zero_fill(pa.Table.from_pylist(getattr(self, name), schema=table_schemas[name]))
                for name in TABLES}


def zero_fill(table: pa.Table) -> pa.Table:
    """The table with every null of a fixed-size list column (face columns of frames without a face)
    replaced by zeros.

    A Parquet file with null fixed-size lists cannot be read back by pyarrow before 26 (nor
    written before 25; apache/arrow#35692), nor by readers that map them to arrays: zeros keep the
    store readable everywhere, and ``face_found`` says which rows hold a face.
    """
    for i, field in enumerate(table.schema):
        col = table.column(i)
        if not pa.types.is_fixed_size_list(field.type) or col.null_count == 0:
            continue
        rows = fixed_size_rows(col.combine_chunks())
        filled = pa.FixedSizeListArray.from_arrays(pa.array(rows.ravel(), field.type.value_type), field.type.list_size)
        table = table.set_column(i, field, filled)
    return table


def fixed_size_rows(arr: pa.FixedSizeListArray) -> np.ndarray:
    """A fixed-size list array as a (rows, size) numpy array of its value type, zeros where a row is null
    (stores written before ``zero_fill`` hold nulls in the face columns)."""
    size = arr.type.list_size
    values = arr.values.slice(arr.offset * size, len(arr) * size).to_numpy(zero_copy_only=False).reshape(len(arr), size)
    if arr.null_count:
        values = values.copy()
        values[~arr.is_valid().to_numpy(zero_copy_only=False)] = 0
    return values
