"""Open-vocabulary label files (MER2023/MER2024, OV-MERD style) and the EMER descriptions.

- OV labels: CSV ``name,openset`` where ``openset`` is a Python-style list literal, e.g.
  ``"['worried', 'nervous']"`` (as published), or a plain comma/semicolon-separated list.
  MER2023's discrete-label file (``name,discrete[,valence]``) is accepted too: one label per clip.
- EMER: CSV ``name,chinese,english``; the English text is the reference explanation.
"""

from __future__ import annotations

import ast

from pipeline.importers.common import ImportError_, ImportReport, VideoIndex, csv_rows, fix_text, read_text, safe_id


def parse_label_list(value: str) -> list[str] | None:
    """Labels from a list literal or a separated string; None when it cannot be read."""
    value = value.strip()
    if not value:
        return []
    if value.startswith("["):
        try:
            parsed = ast.literal_eval(value)  # literals only: never evaluates code
        except (ValueError, SyntaxError):
            return None
        if not isinstance(parsed, (list, tuple)) or not all(isinstance(x, str) for x in parsed):
            return None
        items = parsed
    else:
        items = value.replace(";", ",").split(",")
    out = []
    for x in items:
        x = fix_text(x).strip().lower()
        if x and x not in out:
            out.append(x)
    return out


def read_ov_labels(path: str, report: ImportReport | None = None, storage_options: dict | None = None
                   ) -> dict[str, list[str]]:
    """name -> labels from an OV-MERD (``name,openset``) or MER2023 (``name,discrete``) file."""
    text, _ = read_text(path, storage_options)
    header = text.splitlines()[0] if text else ""
    column = "openset" if "openset" in header else "discrete" if "discrete" in header else None
    if column is None:
        raise ImportError_(f"{path}: expected a 'name,openset' (MER2024 OV) or 'name,discrete' (MER2023) header")
    out: dict[str, list[str]] = {}
    for line, r in csv_rows(text, path, ("name", column)):
        labels = parse_label_list(r[column])
        if labels is None:
            if report is not None:
                report.drop(line, r["name"], f"{path}: unreadable {column} value {r[column][:60]!r}")
            continue
        if not labels and report is not None:
            report.warn(line, r["name"], f"{path}: empty {column}")
        out[r["name"]] = labels
    return out


def import_mer(annotations: str, videos: str, split: str | None = None, storage_options: dict | None = None
               ) -> ImportReport:
    text, digest = read_text(annotations, storage_options)
    report = ImportReport("mer", annotations, digest)
    labels = read_ov_labels(annotations, report, storage_options)
    index = VideoIndex(videos, storage_options)
    lines = {r["name"]: line for line, r in csv_rows(text, annotations, ("name",))}
    for name, labs in labels.items():
        _add(report, index, name, lines[name], labels=labs, split=split)
    return report


def import_emer(annotations: str, videos: str, labels_file: str | None = None, split: str | None = None,
                storage_options: dict | None = None) -> ImportReport:
    text, digest = read_text(annotations, storage_options)
    report = ImportReport("emer", annotations, digest)
    rows = csv_rows(text, annotations, ("name", "english"))
    ov = read_ov_labels(labels_file, report, storage_options) if labels_file else {}
    index = VideoIndex(videos, storage_options)
    for line, r in rows:
        desc = fix_text(r["english"])
        if not r["name"]:
            report.drop(line, None, "name is empty")
            continue
        if not desc:
            report.drop(line, r["name"], "english description is empty")
            continue
        if labels_file and r["name"] not in ov:
            report.warn(line, r["name"], f"no labels for this clip in {labels_file}")
        _add(report, index, r["name"], line, labels=ov.get(r["name"], []), description=desc, split=split)
    return report


def _add(report: ImportReport, index: VideoIndex, name: str, line: int, labels: list[str],
         description: str | None = None, split: str | None = None) -> None:
    vid = safe_id(name)
    if vid in report.ids:
        report.drop(line, name, f"clip {name!r} appears twice (or maps to the same id {vid!r})")
        return
    uri = index.find(name)
    if uri is None:
        report.drop(line, name, f"missing clip {name}.* under {index.root}")
        return
    row = {"video_id": vid, "uri": uri, "labels": labels, "source": report.source(line)}
    if vid != name:
        row["meta"] = {"name": name}
    if description is not None:
        row["description"] = description
    if split:
        row["split"] = split
    report.rows.append(row)
    report.ids.add(vid)
