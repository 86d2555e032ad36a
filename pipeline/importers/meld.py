"""MELD (Poria et al., 2019): Friends dialogues, one clip per utterance.

Annotation CSVs (``train_sent_emo.csv``, ``dev_sent_emo.csv``, ``test_sent_emo.csv``) have
``Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime``
with times ``H:MM:SS,mmm`` (one or two hour digits); clips are ``dia{D}_utt{U}.mp4``.

Modes:
- ``utterance``: one manifest row per clip; its label is the utterance's emotion, and the
  clip's single utterance spans it (length from the episode times).
- ``dialogue``: one row per dialogue; its clips are joined in order into one video
  (``pipeline.importers.join``) and each utterance becomes a segment with its text, speaker
  and label at its exact place in the joined video. The clip-level labels are the
  dialogue's emotions, most frequent first (``neutral`` only when nothing else occurs).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

from pipeline.importers.common import ImportReport, VideoIndex, csv_rows, fix_text, read_text
from pipeline.importers.join import JoinError, join_clips

COLUMNS = ("Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID", "StartTime", "EndTime")
EMOTIONS = {"neutral", "joy", "sadness", "anger", "surprise", "fear", "disgust"}
_TIME = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})[,.](\d{1,3})$")


def parse_time(text: str) -> float | None:
    m = _TIME.match(text.strip())
    if not m:
        return None
    h, mi, s, ms = m.groups()
    return int(h) * 3600 + int(mi) * 60 + int(s) + int(ms.ljust(3, "0")) / 1000


def _utterances(report: ImportReport, rows, index: VideoIndex, prefix: str) -> list[dict]:
    """Validated utterances in file order; bad rows are reported and dropped."""
    out, seen = [], set()
    for line, r in rows:
        try:
            d, u = int(r["Dialogue_ID"]), int(r["Utterance_ID"])
        except ValueError:
            report.drop(line, None, f"Dialogue_ID/Utterance_ID not integers ({r['Dialogue_ID']!r}, {r['Utterance_ID']!r})")
            continue
        stem = f"dia{d}_utt{u}"
        vid = f"{prefix}{stem}"
        if (d, u) in seen:
            report.drop(line, vid, "repeats an earlier (Dialogue_ID, Utterance_ID)")
            continue
        seen.add((d, u))
        emotion = r["Emotion"].strip().lower()
        if emotion not in EMOTIONS:
            report.drop(line, vid, f"unknown Emotion {r['Emotion']!r} (MELD has {', '.join(sorted(EMOTIONS))})")
            continue
        start, end = parse_time(r["StartTime"]), parse_time(r["EndTime"])
        times_ok = start is not None and end is not None and end > start
        if not times_ok:
            report.warn(line, vid, f"unusable times {r['StartTime']!r} -> {r['EndTime']!r}; clip length unknown")
        raw = r["Utterance"]
        text = fix_text(raw)
        if text != " ".join(raw.split()):
            report.warn(line, vid, "repaired mis-encoded text")
        uri = index.find(stem)
        if uri is None:
            report.drop(line, vid, f"missing clip {stem}.mp4 under {index.root}")
            continue
        out.append({"line": line, "dialogue": d, "utt": u, "video_id": vid, "uri": uri, "text": text,
                    "speaker": fix_text(r["Speaker"]), "emotion": emotion, "sentiment": r.get("Sentiment", ""),
                    "start": start, "end": end, "duration": (end - start) if times_ok else None,
                    "season": r.get("Season"), "episode": r.get("Episode")})
    return out


def import_meld(annotations: str, videos: str, mode: str = "utterance", split: str | None = None,
                joined_dir: str | None = None, storage_options: dict | None = None) -> ImportReport:
    if mode not in ("utterance", "dialogue"):
        raise ValueError(f"MELD mode must be utterance or dialogue, got {mode!r}")
    text, digest = read_text(annotations, storage_options)
    report = ImportReport("meld", annotations, digest)
    rows = csv_rows(text, annotations, COLUMNS)
    index = VideoIndex(videos, storage_options)
    prefix = f"{split}_" if split else ""
    utts = _utterances(report, rows, index, prefix)
    if mode == "utterance":
        for x in utts:
            row = {"video_id": x["video_id"], "uri": x["uri"], "labels": [x["emotion"]],
                   "meta": {"sentiment": x["sentiment"], "speaker": x["speaker"], "dialogue_id": x["dialogue"],
                            "utterance_id": x["utt"], "season": x["season"], "episode": x["episode"]},
                   "source": report.source(x["line"])}
            if split:
                row["split"] = split
            if x["duration"] is not None:
                u = {"start_s": 0.0, "end_s": round(x["duration"], 3), "text": x["text"], "speaker": x["speaker"]}
                row["utterances"] = [u]
                row["utterance_labels"] = [{"start_s": 0.0, "end_s": u["end_s"], "labels": [x["emotion"]]}]
            report.rows.append(row)
        return report

    if "://" in videos:
        raise ValueError("dialogue mode joins clips with ffmpeg and needs a local videos folder")
    joined = Path(joined_dir or "meld_dialogues")
    by_dialogue: dict[int, list[dict]] = {}
    for x in utts:
        by_dialogue.setdefault(x["dialogue"], []).append(x)
    for d, items in sorted(by_dialogue.items()):
        items.sort(key=lambda x: x["utt"])
        for a, b in zip(items, items[1:]):
            if a["end"] is not None and b["start"] is not None and b["start"] < a["end"]:
                report.warn(b["line"], b["video_id"], f"starts {a['end'] - b['start']:.3f} s before utterance "
                                                      f"{a['utt']} ends in the episode; the clips are joined in order")
        vid = f"{prefix}dia{d}"
        out = joined / f"{vid}.mp4"
        try:
            spans = join_clips([x["uri"] for x in items], out)
        except JoinError as exc:
            for x in items:
                report.drop(x["line"], vid, f"dialogue {d} could not be joined: {exc}")
            continue
        counts = Counter(x["emotion"] for x in items)
        labels = [e for e, _ in counts.most_common() if e != "neutral"] or ["neutral"]
        row = {"video_id": vid, "uri": str(out.resolve()), "labels": labels,
               "utterances": [{"start_s": s, "end_s": e, "text": x["text"], "speaker": x["speaker"]}
                              for x, (s, e) in zip(items, spans)],
               "utterance_labels": [{"start_s": s, "end_s": e, "labels": [x["emotion"]]}
                                    for x, (s, e) in zip(items, spans)],
               "meta": {"dialogue_id": d, "clips": [x["video_id"] for x in items],
                        "sentiments": [x["sentiment"] for x in items]},
               "source": report.source(items[0]["line"]) | {"lines": [x["line"] for x in items]}}
        if split:
            row["split"] = split
        report.rows.append(row)
    return report
