"""Manifests: which videos to process, with optional utterances, labels and descriptions.

A manifest is JSONL (``.jsonl``/``.ndjson``/``.json``), CSV or Parquet, on local disk or any
fsspec URL (``s3://``), optionally compressed (``.gz``, ``.zst``, ... inferred from the
name). Columns / keys:

==================  ========  ==================================================================
``video_id``        required  ``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 128 characters; used in
                              output keys, so anything path-like is refused
``uri``             required  local path, ``file://`` or ``s3://`` URL; relative paths resolve
                              against the manifest's own directory
``split``           optional  ``train`` / ``val`` / ``test`` (anything else is kept as given)
``labels``          optional  list of strings (CSV: JSON list or ``;``/``,``-separated)
``description``     optional  reference explanation
``utterances``      optional  list of ``{start_s, end_s, text?, speaker?}`` (CSV/Parquet: JSON)
``srt``             optional  SRT sidecar, resolved like ``uri``
``utterance_labels`` optional list of ``{start_s, end_s, labels}``
==================  ========  ==================================================================

Problems with the file as a whole (unreadable, not the format its name says, required
columns missing, no rows) raise :class:`ManifestError`. Problems with one row are recorded on
that row (``error_type``, ``error``, 1-based ``line``) so a corpus run can account for it and
go on; ``strict=True`` turns any row problem into a :class:`ManifestError` listing them.
Rows whose id is missing, unsafe or repeated get a placeholder id ``_line<N>`` (which no
valid id can equal) so every problem still has a row of its own.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
URI_SCHEMES = ("file", "s3")
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")


class ManifestError(ValueError):
    """The manifest as a whole cannot be used; the message names the file (and line)."""


@dataclass
class Utterance:
    """One utterance: times in seconds from the start of the video."""

    index: int
    start_s: float
    end_s: float
    text: str = ""
    speaker: str = ""
    source: str = "manifest"  # manifest | srt | asr


@dataclass
class ManifestEntry:
    line: int  # 1-based line (JSONL/CSV, header = line 1) or row number (Parquet)
    video_id: str
    uri: str = ""
    split: str | None = None
    labels: list[str] = field(default_factory=list)
    description: str | None = None
    utterances: list[Utterance] | None = None
    srt: str | None = None
    utterance_labels: list[dict] | None = None
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_type is None


@dataclass
class Manifest:
    source: str
    format: str
    entries: list[ManifestEntry]

    @property
    def valid(self) -> list[ManifestEntry]:
        return [e for e in self.entries if e.ok]

    @property
    def invalid(self) -> list[ManifestEntry]:
        return [e for e in self.entries if not e.ok]


# ---------------------------------------------------------------------------- reading

def detect_format(path: str) -> str:
    name = path.lower()
    for ext in COMPRESSIONS:
        if name.endswith(ext):
            name = name[: -len(ext)]
    for ext, fmt in FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ManifestError(f"{path}: unknown manifest format (expected .jsonl, .csv or .parquet)")


def _base_dir(path: str) -> str:
    if "://" in path:
        return posixpath.dirname(path)
    return str(Path(path).resolve().parent)


def read_manifest(path: str | Path, strict: bool = False, storage_options: dict | None = None) -> Manifest:
    """Read and validate a manifest; see the module docstring for the format and error rules."""
    import fsspec

    path = str(path)
    fmt = detect_format(path)
    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            with fsspec.open(path, "rb", **(storage_options or {})) as f:
                table = pq.read_table(f)
            rows = [(i + 1, r) for i, r in enumerate(table.to_pylist())]
            columns = set(table.column_names)
        else:
            with fsspec.open(path, "rt", compression="infer", encoding="utf-8", **(storage_options or {})) as f:
                text = f.read()
            rows, columns = _parse_jsonl(path, text) if fmt == "jsonl" else _parse_csv(path, text)
    except ManifestError:
        raise
    except FileNotFoundError as exc:
        raise ManifestError(f"{path}: no such manifest") from exc
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({type(exc).__name__}: {exc})") from exc
    if columns is not None:
        missing = [c for c in ("video_id", "uri") if c not in columns]
        if missing:
            raise ManifestError(f"{path}: required column(s) missing: {', '.join(missing)}")
    if not rows:
        raise ManifestError(f"{path}: manifest has no rows")
    base = _base_dir(path)
    entries = [_entry(line, row, base) for line, row in rows]
    _mark_duplicates(entries)
    manifest = Manifest(path, fmt, entries)
    if strict and manifest.invalid:
        shown = "; ".join(f"line {e.line}: {e.error}" for e in manifest.invalid[:5])
        more = len(manifest.invalid) - 5
        raise ManifestError(f"{path}: {len(manifest.invalid)} bad row(s): {shown}" + (f"; and {more} more" if more > 0 else ""))
    return manifest


def _parse_jsonl(path: str, text: str) -> tuple[list[tuple[int, Any]], None]:
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            rows.append((n, _BadRow(f"not valid JSON ({exc.msg} at column {exc.colno})")))
    return rows, None


def _parse_csv(path: str, text: str) -> tuple[list[tuple[int, Any]], set[str]]:
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise ManifestError(f"{path}: empty CSV (no header)")
    columns = {c.strip() for c in reader.fieldnames}
    rows = []
    for row in reader:
        clean = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items() if k is not None}
        clean = {k: v for k, v in clean.items() if v not in ("", None)}
        for key in ("utterances", "utterance_labels"):
            if key in clean:
                try:
                    clean[key] = json.loads(clean[key])
                except json.JSONDecodeError:
                    clean[key] = _BadRow(f"{key}: not valid JSON")
        if "labels" in clean:
            clean["labels"] = _split_labels(clean["labels"])
        rows.append((reader.line_num, clean))
    return rows, columns


def _split_labels(value: str) -> Any:
    value = value.strip()
    if value.startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return _BadRow("labels: not a valid JSON list")
    sep = ";" if ";" in value else ","
    return [x.strip() for x in value.split(sep) if x.strip()]


class _BadRow:
    def __init__(self, message: str):
        self.message = message


class _RowError(Exception):
    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


# ---------------------------------------------------------------------------- validation

def single_entry(uri: str, srt: str | None = None, video_id: str | None = None) -> ManifestEntry:
    """A validated entry for one video given on a command line (id from the file name, made safe).

    Raises ManifestError naming the problem (bad scheme, unsafe SRT path, ...)."""
    stem = posixpath.basename(str(uri).rstrip("/")).rsplit(".", 1)[0]
    vid = video_id or (re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")[:128] or "video")
    if not vid[0].isalnum():
        vid = "v" + vid[:127]
    row: dict[str, Any] = {"video_id": vid.replace("..", "_"), "uri": uri}
    if srt:
        row["srt"] = srt
    entry = _entry(1, row, os.getcwd())
    if not entry.ok:
        raise ManifestError(f"{uri}: {entry.error}")
    return entry


def _entry(line: int, row: Any, base: str) -> ManifestEntry:
    placeholder = f"_line{line}"
    if isinstance(row, _BadRow):
        return ManifestEntry(line, placeholder, error_type="bad_row", error=row.message)
    if not isinstance(row, dict):
        return ManifestEntry(line, placeholder, error_type="bad_row", error="row is not an object")
    raw_id = row.get("video_id")
    if raw_id is None or (isinstance(raw_id, str) and not raw_id.strip()):
        return ManifestEntry(line, placeholder, error_type="missing_id", error="video_id is missing")
    vid = str(raw_id).strip() if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else None
    if vid is None or not SAFE_ID.match(vid) or ".." in vid:
        return ManifestEntry(line, placeholder, error_type="bad_id",
                             error=f"video_id {str(raw_id)[:80]!r} is not [A-Za-z0-9][A-Za-z0-9._-]* (max 128)")
    entry = ManifestEntry(line, vid)
    try:
        entry.uri = _resolve_uri(row.get("uri"), base, "uri", required=True)
        if row.get("srt") is not None:
            entry.srt = _resolve_uri(row.get("srt"), base, "srt", required=False)
        entry.split = None if row.get("split") is None else str(row["split"])
        entry.labels = _labels(row.get("labels"), "labels")
        desc = row.get("description")
        entry.description = None if desc is None else str(desc)
        if row.get("utterances") is not None:
            entry.utterances = _utterances(row["utterances"])
        if row.get("utterance_labels") is not None:
            entry.utterance_labels = _utterance_labels(row["utterance_labels"])
    except _RowError as exc:
        entry.error_type, entry.error = exc.error_type, str(exc)
    return entry


def _resolve_uri(value: Any, base: str, key: str, required: bool) -> str:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise _RowError(f"missing_{key}", f"{key} is missing")
    if not isinstance(value, str):
        raise _RowError(f"bad_{key}", f"{key} must be a string")
    value = value.strip()
    if "\0" in value:
        raise _RowError(f"bad_{key}", f"{key} contains a NUL byte")
    if "://" in value:
        scheme = value.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            raise _RowError(f"bad_{key}", f"{key} scheme {scheme}:// is not allowed (use a path, file:// or s3://)")
        return value[len("file://"):] if scheme == "file" else value
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not re.match(r"^[A-Za-z]:[\\/]", value):
        raise _RowError(f"bad_{key}", f"{key} {value[:60]!r} looks like a URL without '//'")
    if Path(value).is_absolute():
        return value
    if "://" in base:  # relative to a remote manifest: same bucket, same folder
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, value))}"
    return str((Path(base) / value).resolve())


def _labels(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, _BadRow):
        raise _RowError("bad_labels", value.message)
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
        return [x.strip() for x in value if x.strip()]
    raise _RowError("bad_labels", f"{key} must be a list of strings")


def _time(u: dict, key: str, where: str, error_type: str) -> float:
    v = u.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise _RowError(error_type, f"{where}: {key} is missing or not a number")
    try:
        t = float(v)
    except ValueError:
        raise _RowError(error_type, f"{where}: {key} {v!r} is not a number") from None
    if not math.isfinite(t) or t < 0:
        raise _RowError(error_type, f"{where}: {key} {v!r} must be a finite number >= 0")
    return t


def _spans(value: Any, field: str, item: str, error_type: str) -> Iterable[tuple[str, dict, float, float]]:
    """(where, item, start_s, end_s) for a list of ``{start_s, end_s, ...}`` objects, each checked:
    times finite, >= 0 and end after start. ``field`` names the list and ``item`` its elements in
    messages."""
    if isinstance(value, _BadRow):
        raise _RowError(error_type, value.message)
    if not isinstance(value, list):
        raise _RowError(error_type, f"{field} must be a list")
    for k, u in enumerate(value):
        where = f"{item} {k}"
        if not isinstance(u, dict):
            raise _RowError(error_type, f"{where}: not an object")
        start, end = _time(u, "start_s", where, error_type), _time(u, "end_s", where, error_type)
        if end <= start:
            raise _RowError(error_type, f"{where}: end_s {end} is not after start_s {start}")
        yield where, u, start, end


def _utterances(value: Any) -> list[Utterance]:
    out = [Utterance(0, start, end, str(u.get("text") or ""), str(u.get("speaker") or ""))
           for _, u, start, end in _spans(value, "utterances", "utterance", "bad_utterances")]
    out.sort(key=lambda u: u.start_s)
    for i, u in enumerate(out):
        u.index = i
    return out


def _utterance_labels(value: Any) -> list[dict]:
    return [{"start_s": start, "end_s": end, "labels": _labels(u.get("labels"), where)}
            for where, u, start, end in _spans(value, "utterance_labels", "utterance_labels", "bad_labels")]


def _mark_duplicates(entries: list[ManifestEntry]) -> None:
    """Keep the first row of a repeated id; later ones become errors with placeholder ids."""
    first: dict[str, int] = {}
    for e in entries:
        if e.video_id.startswith("_line"):
            continue
        if e.video_id in first:
            e.error_type = "duplicate_id"
            e.error = f"video_id {e.video_id!r} repeats line {first[e.video_id]}"
            e.video_id = f"_line{e.line}"
        else:
            first[e.video_id] = e.line
