"""In-house corpora: any CSV or JSONL, with a column mapping given on the command line.

``--map video_id=clip,uri=path,labels=emotions,description=why,split=fold`` names which
source column feeds which manifest field. ``video_id`` is required; ``uri`` may be omitted
(clips are then found by id under ``--videos``) or relative (resolved against ``--videos``).
``labels`` accepts a list, a list literal or a comma/semicolon-separated string;
``utterances`` accepts a JSON list of ``{start_s, end_s, text}``.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path

from pipeline.importers.common import ImportError_, ImportReport, VideoIndex, csv_rows, fix_text, read_text, safe_id
from pipeline.importers.labels import parse_label_list

FIELDS = ("video_id", "uri", "labels", "description", "split", "utterances")


def parse_mapping(items: list[str]) -> dict[str, str]:
    """``["video_id=clip", "labels=emo"]`` -> {"video_id": "clip", "labels": "emo"}."""
    mapping = {}
    for item in items:
        for part in item.split(","):
            key, sep, col = part.partition("=")
            key, col = key.strip(), col.strip()
            if not sep or not key or not col:
                raise ImportError_(f"--map {part!r}: expected FIELD=COLUMN")
            if key not in FIELDS:
                raise ImportError_(f"--map {key}: unknown field (fields: {', '.join(FIELDS)})")
            mapping[key] = col
    if "video_id" not in mapping:
        raise ImportError_("--map must name the video_id column, e.g. --map video_id=clip")
    return mapping


def import_generic(annotations: str, videos: str, mapping: dict[str, str], storage_options: dict | None = None
                   ) -> ImportReport:
    text, digest = read_text(annotations, storage_options)
    report = ImportReport("generic", annotations, digest)
    if annotations.lower().rsplit(".", 1)[-1] in ("jsonl", "ndjson", "json"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                report.drop(n, None, f"not valid JSON ({exc.msg})")
                continue
            if not isinstance(obj, dict):
                report.drop(n, None, "not a JSON object")
                continue
            rows.append((n, obj))
        missing = [c for c in mapping.values() if rows and all(c not in r for _, r in rows)]
        if missing:
            raise ImportError_(f"{annotations}: mapped column(s) found in no row: {', '.join(missing)}")
    else:
        rows = csv_rows(text, annotations, tuple(mapping.values()))
    index = VideoIndex(videos, storage_options)
    for line, r in rows:
        name = str(r.get(mapping["video_id"]) or "").strip()
        if not name:
            report.drop(line, None, f"{mapping['video_id']} is empty")
            continue
        vid = safe_id(name)
        if vid in report.ids:
            report.drop(line, name, f"id {name!r} appears twice (or maps to the same id {vid!r})")
            continue
        if "uri" in mapping and str(r.get(mapping["uri"]) or "").strip():
            uri = str(r[mapping["uri"]]).strip()
            if "://" not in uri and not Path(uri).is_absolute():
                uri = posixpath.join(videos, uri) if "://" in videos else str(Path(videos) / uri)
        else:
            uri = index.find(name)
            if uri is None:
                report.drop(line, name, f"missing clip {name}.* under {videos}")
                continue
        row = {"video_id": vid, "uri": uri, "source": report.source(line)}
        if "labels" in mapping:
            value = r.get(mapping["labels"])
            labels = value if isinstance(value, list) else parse_label_list(str(value or ""))
            if labels is None:
                report.drop(line, name, f"unreadable labels {str(value)[:60]!r}")
                continue
            row["labels"] = [str(x) for x in labels]
        if "description" in mapping and r.get(mapping["description"]):
            row["description"] = fix_text(str(r[mapping["description"]]))
        if "split" in mapping and r.get(mapping["split"]):
            row["split"] = str(r[mapping["split"]])
        if "utterances" in mapping and r.get(mapping["utterances"]):
            value = r[mapping["utterances"]]
            try:
                row["utterances"] = value if isinstance(value, list) else json.loads(value)
            except json.JSONDecodeError:
                report.drop(line, name, "utterances is not a JSON list")
                continue
        if vid != name:
            row["meta"] = {"name": name}
        report.rows.append(row)
        report.ids.add(vid)
    return report
