"""What every importer shares: reading annotation text, finding videos, reporting, writing.

Every importer validates all rows first and reports each bad one with its line number.
Nothing is dropped silently: a row that cannot become a manifest row is listed with its
reason in ``MANIFEST.dropped.jsonl``, and ``MANIFEST.report.json`` summarises the import.
Each manifest row records where it came from (``source``: format, file, sha256, line).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_EXTS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".m4v")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ImportError_(ValueError):
    """The annotation file as a whole cannot be imported (exit code 2)."""


@dataclass
class ImportReport:
    format: str
    annotations: str
    sha256: str
    rows: list[dict] = field(default_factory=list)  # manifest rows
    dropped: list[dict] = field(default_factory=list)  # {line, id, reason}
    warnings: list[dict] = field(default_factory=list)  # {line, id, message}
    ids: set = field(default_factory=set)  # video ids already in rows

    def drop(self, line: int, ident: str | None, reason: str) -> None:
        self.dropped.append({"line": line, "id": ident, "reason": reason})

    def warn(self, line: int, ident: str | None, message: str) -> None:
        self.warnings.append({"line": line, "id": ident, "message": message})

    def source(self, line: int) -> dict:
        return {"format": self.format, "file": self.annotations, "sha256": self.sha256, "line": line}


def read_text(path: str, storage_options: dict | None = None) -> tuple[str, str]:
    """(text, sha256) of an annotation file; UTF-8 (BOM allowed), else cp1252 (MELD's CSVs are)."""
    import fsspec

    try:
        with fsspec.open(path, "rb", **(storage_options or {})) as f:
            raw = f.read()
    except FileNotFoundError:
        raise ImportError_(f"{path}: no such annotation file") from None
    digest = hashlib.sha256(raw).hexdigest()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text, digest


def fix_text(text: str) -> str:
    """Undo the common UTF-8-read-as-cp1252 mojibake (``â€™`` -> ``’``) and normalise spaces."""
    if any(m in text for m in ("â€", "Ã", "Â")):
        try:
            text = text.encode("cp1252").decode("utf-8")
        except (UnicodeEncodeError, UnicodeDecodeError):
            pass
    return " ".join(text.replace("\u0092", "'").split())


def csv_rows(text: str, path: str, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line, row) pairs of a CSV with a header; missing required columns reject the file."""
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None:
        raise ImportError_(f"{path}: empty file (no header)")
    header = [h.strip() for h in reader.fieldnames]
    missing = [c for c in required if c not in header]
    if missing:
        raise ImportError_(f"{path}: required column(s) missing: {', '.join(missing)} (found: {', '.join(header)})")
    rows = []
    line = 1
    for row in reader:
        rows.append((line + 1, {(k or "").strip(): (v or "").strip() if isinstance(v, str) else v
                                for k, v in row.items()}))
        line = reader.line_num
    return rows


def safe_id(text: str) -> str:
    """A manifest-safe id ([A-Za-z0-9._-], starting alphanumeric) from a published clip name."""
    out = _SAFE.sub("_", text.strip()).strip("._-")
    return out[:128] or "x"


class VideoIndex:
    """Finds a clip by its stem under a local folder or an ``s3://`` prefix (listed once)."""

    def __init__(self, root: str, storage_options: dict | None = None):
        import fsspec

        self.root = root.rstrip("/")
        self.remote = "://" in root
        fs, base = fsspec.core.url_to_fs(self.root, **(storage_options or {}))
        if not fs.exists(base):
            raise ImportError_(f"{root}: no such videos folder")
        self.by_stem: dict[str, str] = {}
        for path in sorted(fs.find(base)):
            name = posixpath.basename(path)
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTS:
                rel = posixpath.relpath(path, base)
                full = f"{self.root.split('://')[0]}://{path}" if self.remote else str(Path(self.root) / rel)
                self.by_stem.setdefault(stem, full)

    def find(self, stem: str) -> str | None:
        return self.by_stem.get(stem)


def write_outputs(report: ImportReport, out: str) -> dict:
    """Write the manifest, the dropped-rows list and the report; returns the report summary."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in report.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out_path)
    stem = out_path.name.rsplit(".", 1)[0]
    dropped = out_path.with_name(f"{stem}.dropped.jsonl")
    with open(dropped, "w", encoding="utf-8") as f:
        for d in report.dropped:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    summary = {"format": report.format, "annotations": report.annotations, "sha256": report.sha256,
               "manifest": str(out_path), "rows": len(report.rows), "dropped": len(report.dropped),
               "warnings": report.warnings, "dropped_file": str(dropped)}
    out_path.with_name(f"{stem}.report.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    return summary
