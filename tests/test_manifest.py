import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pathlib import Path

from pipeline.manifest import ManifestError, read_manifest


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"video_id": "a1", "uri": "videos/a1.mp4", "split": "train", "labels": ["happy", "joyful"],
        "utterances": [{"start_s": 2.0, "end_s": 3.5, "text": "second"}, {"start_s": 0.5, "end_s": 1.5, "text": "first"}]}


def test_good_rows_resolve_relative_uris_and_sort_utterances(tmp_path):
    m = read_manifest(write_jsonl(tmp_path / "m.jsonl", [GOOD, {"video_id": "b", "uri": "/abs/b.mp4", "srt": "b.srt"}]))
    a, b = m.entries
    assert m.format == "jsonl" and a.ok and b.ok
    assert a.uri == str(tmp_path / "videos" / "a1.mp4") and b.uri == "/abs/b.mp4"
    assert b.srt == str(tmp_path / "b.srt")
    assert [(u.index, u.text, u.start_s) for u in a.utterances] == [(0, "first", 0.5), (1, "second", 2.0)]
    assert a.labels == ["happy", "joyful"] and a.split == "train"


@pytest.mark.parametrize("row, error_type, fragment", [
    ({"uri": "x.mp4"}, "missing_id", "video_id is missing"),
    ({"video_id": "../../etc/x", "uri": "x.mp4"}, "bad_id", "'../../etc/x'"),
    ({"video_id": "a/b", "uri": "x.mp4"}, "bad_id", "is not"),
    ({"video_id": ".hidden", "uri": "x.mp4"}, "bad_id", "is not"),
    ({"video_id": "ok"}, "missing_uri", "uri is missing"),
    ({"video_id": "ok", "uri": "http://evil/x.mp4"}, "bad_uri", "http:// is not allowed"),
    ({"video_id": "ok", "uri": "x.mp4", "utterances": [{"start_s": 2, "end_s": 1}]}, "bad_utterances", "not after"),
    ({"video_id": "ok", "uri": "x.mp4", "utterances": [{"start_s": -1, "end_s": 1}]}, "bad_utterances", ">= 0"),
    ({"video_id": "ok", "uri": "x.mp4", "utterances": [{"start_s": "soon", "end_s": 1}]}, "bad_utterances", "not a number"),
    ({"video_id": "ok", "uri": "x.mp4", "utterances": [{"end_s": 1}]}, "bad_utterances", "start_s is missing"),
    ({"video_id": "ok", "uri": "x.mp4", "labels": [1, 2]}, "bad_labels", "list of strings"),
    ("{not json", "bad_row", "not valid JSON"),
    ([1, 2], "bad_row", "not an object"),
])
def test_bad_rows_are_recorded_with_line_numbers(tmp_path, row, error_type, fragment):
    m = read_manifest(write_jsonl(tmp_path / "m.jsonl", [GOOD, row]))
    assert m.entries[0].ok
    bad = m.entries[1]
    assert (bad.line, bad.error_type) == (2, error_type)
    assert fragment in bad.error
    if error_type in ("missing_id", "bad_id", "bad_row"):
        assert bad.video_id == "_line2"  # a placeholder no valid id can equal


def test_duplicate_ids_keep_the_first_row(tmp_path):
    m = read_manifest(write_jsonl(tmp_path / "m.jsonl", [GOOD, dict(GOOD, uri="other.mp4")]))
    first, dup = m.entries
    assert first.ok and first.uri.endswith("a1.mp4")
    assert dup.error_type == "duplicate_id" and "repeats line 1" in dup.error and dup.video_id == "_line2"
    assert len({e.video_id for e in m.entries}) == 2


def test_strict_mode_rejects_the_manifest_listing_lines(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [GOOD, {"uri": "x"}, {"video_id": "b"}])
    with pytest.raises(ManifestError, match=r"2 bad row\(s\): line 2: video_id is missing; line 3: uri is missing"):
        read_manifest(path, strict=True)


def test_csv_with_labels_and_json_utterances(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text('video_id,uri,labels,utterances\n'
                    'a,a.mp4,happy; excited,"[{""start_s"": 0.1, ""end_s"": 0.9}]"\n'
                    'b,b.mp4,"[""sad""]",\n'
                    'c,c.mp4,,"[{broken"\n')
    a, b, c = read_manifest(path).entries
    assert a.labels == ["happy", "excited"] and a.utterances[0].end_s == 0.9 and a.line == 2
    assert b.labels == ["sad"] and b.utterances is None
    assert c.error_type == "bad_utterances" and c.line == 4


def test_parquet_and_gzip(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"video_id": "a", "uri": "a.mp4", "labels": ["calm"]}]), tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet").entries[0].labels == ["calm"]
    with gzip.open(tmp_path / "m.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n")
    assert read_manifest(tmp_path / "m.jsonl.gz").entries[0].ok


@pytest.mark.parametrize("name, content, fragment", [
    ("m.txt", "x", "unknown manifest format"),
    ("m.csv", "id,path\n1,a.mp4\n", "required column(s) missing: video_id, uri"),
    ("m.csv", "", "empty CSV"),
    ("m.jsonl", "\n\n", "no rows"),
    ("missing.jsonl", None, "no such manifest"),
    ("m.parquet", "not parquet", "cannot read manifest"),
])
def test_unusable_manifests_raise_naming_the_file(tmp_path, name, content, fragment):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ManifestError, match=fragment.replace("(", r"\(").replace(")", r"\)")) as exc:
        read_manifest(path)
    assert name in str(exc.value)


@pytest.mark.integration
def test_the_synth_corpus_manifest_reads_clean(corpus):
    out, cfg, _ = corpus
    m = read_manifest(out / "manifest.jsonl", strict=True)
    assert len(m.entries) == cfg.videos
    for e in m.entries:
        assert Path(e.uri).is_file() and (e.srt is None or Path(e.srt).is_file())
        assert e.labels and e.utterance_labels
