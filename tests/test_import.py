"""`microemo import`: hand-written annotation files in each published format, with their quirks."""

from __future__ import annotations

import json
import shutil
import subprocess

import cv2
import numpy as np
import pytest

from jobs.cli import main
from pipeline.manifest import read_manifest

MELD_HEADER = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"


def fake_clips(folder, names, ext=".mp4"):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / f"{n}{ext}").write_bytes(b"not decoded by the importer")
    return folder


def run_import(argv, capsys):
    code = main(["import", *argv])
    return code, capsys.readouterr()


def manifest_rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def test_meld_utterance_mode_with_quirks(tmp_path, capsys):
    csv = tmp_path / "train_sent_emo.csv"
    # cp1252 bytes (MELD's CSVs are not UTF-8), a one-digit hour, a reversed time, an unknown
    # emotion, a missing clip and a repeated (dialogue, utterance) pair
    rows = [
        '1,"Oh my God, he\u2019s lost it.",Monica,surprise,positive,0,0,3,19,"0:16:16,059","0:16:21,731"\n',
        '2,Mmm-hmm.,Rachel,joy,positive,0,1,3,19,"00:16:22,000","00:16:23,500"\n',
        '3,Backwards.,Ross,anger,negative,0,2,3,19,"00:16:30,000","00:16:25,000"\n',
        '4,What?,Joey,bored,neutral,0,3,3,19,"00:16:31,000","00:16:32,000"\n',
        '5,Where is it?,Chandler,fear,negative,1,0,3,19,"00:17:00,000","00:17:02,000"\n',
        '6,Again.,Ross,anger,negative,0,1,3,19,"00:16:22,000","00:16:23,500"\n',
    ]
    csv.write_bytes((MELD_HEADER + "".join(rows)).encode("cp1252"))
    videos = fake_clips(tmp_path / "train_splits", ["dia0_utt0", "dia0_utt1", "dia0_utt2", "dia0_utt3"])
    out = tmp_path / "meld.jsonl"
    code, cap = run_import(["meld", "--annotations", str(csv), "--videos", str(videos), "--out", str(out),
                            "--split", "train"], capsys)
    assert code == 0
    m = read_manifest(out, strict=True)  # preprocess accepts it
    ids = [e.video_id for e in m.entries]
    assert ids == ["train_dia0_utt0", "train_dia0_utt1", "train_dia0_utt2"]
    first = manifest_rows(out)[0]
    assert first["labels"] == ["surprise"] and first["split"] == "train"
    assert first["utterances"][0]["text"] == "Oh my God, he\u2019s lost it."
    assert first["utterances"][0]["end_s"] == pytest.approx(5.672)
    assert first["source"]["sha256"] and first["source"]["line"] == 2
    assert "utterances" not in manifest_rows(out)[2]  # reversed times: no inline span, ASR decides
    dropped = {d["line"]: d["reason"] for d in map(json.loads, (tmp_path / "meld.dropped.jsonl").read_text().splitlines())}
    assert "unknown Emotion 'bored'" in dropped[5]
    assert "missing clip dia1_utt0.mp4" in dropped[6]
    assert "repeats" in dropped[7]
    report = json.loads((tmp_path / "meld.report.json").read_text())
    assert report["rows"] == 3 and report["dropped"] == 3
    assert any("unusable times" in w["message"] for w in report["warnings"])
    assert "3 dropped" in cap.out


def test_meld_missing_columns_is_a_usage_error(tmp_path, capsys):
    csv = tmp_path / "bad.csv"
    csv.write_text("Utterance,Speaker\nhi,Ross\n")
    code, cap = run_import(["meld", "--annotations", str(csv), "--videos", str(tmp_path), "--out",
                            str(tmp_path / "m.jsonl")], capsys)
    assert code == 2 and "required column(s) missing: Emotion" in cap.err


def test_mer_openset_labels(tmp_path, capsys):
    csv = tmp_path / "check-openset.csv"
    csv.write_text("name,openset\n"
                   "sample_00000007,\"['excited', 'joyful', 'happy']\"\n"
                   "sample_00000220,['surprised']\n"
                   "sample_00000300,\"['broken'\"\n"
                   "sample_00000400,\"__import__('os').system('x')\"\n"
                   "sample_00000500,\"worried; nervous\"\n")
    videos = fake_clips(tmp_path / "video", ["sample_00000007", "sample_00000220", "sample_00000300",
                                             "sample_00000500"])
    out = tmp_path / "mer.jsonl"
    code, _ = run_import(["mer", "--annotations", str(csv), "--videos", str(videos), "--out", str(out)], capsys)
    assert code == 0
    rows = {r["video_id"]: r["labels"] for r in manifest_rows(out)}
    assert rows["sample_00000220"] == ["surprised"]
    assert rows["sample_00000007"] == ["excited", "joyful", "happy"] and rows["sample_00000500"] == ["worried", "nervous"]
    assert "sample_00000300" not in rows and "sample_00000400" not in rows  # unreadable, never evaluated
    read_manifest(out, strict=True)


def test_emer_descriptions_with_separate_labels(tmp_path, capsys):
    csv = tmp_path / "emer.csv"
    csv.write_text("name,chinese,english\n"
                   "sample_00000001,他很生气。,\"In the video, the man frowns and raises his voice; he is angry.\"\n"
                   "sample_00000002,她笑了。,\n"
                   "sample_00000003,他哭了。,\"He cries, so he is sad.\"\n", encoding="utf-8")
    labels = tmp_path / "ov.csv"
    labels.write_text("name,openset\nsample_00000001,\"['angry', 'dissatisfied']\"\n")
    videos = fake_clips(tmp_path / "video", ["sample_00000001", "sample_00000002"]) 
    fake_clips(videos, ["sample_00000003"], ext=".avi")
    out = tmp_path / "emer.jsonl"
    code, _ = run_import(["emer", "--annotations", str(csv), "--labels", str(labels), "--videos", str(videos),
                          "--out", str(out)], capsys)
    assert code == 0
    rows = {r["video_id"]: r for r in manifest_rows(out)}
    assert rows["sample_00000001"]["labels"] == ["angry", "dissatisfied"]
    assert rows["sample_00000001"]["description"].startswith("In the video")
    assert rows["sample_00000003"]["uri"].endswith(".avi") and rows["sample_00000003"]["labels"] == []
    assert "sample_00000002" not in rows  # empty description: dropped and reported
    report = json.loads((tmp_path / "emer.report.json").read_text())
    assert report["dropped"] == 1 and any("no labels" in w["message"] for w in report["warnings"])
    read_manifest(out, strict=True)


def test_generic_mapping_csv_and_jsonl(tmp_path, capsys):
    videos = fake_clips(tmp_path / "clips", ["a", "b"])
    csv = tmp_path / "in.csv"
    csv.write_text("clip,emotions,why,fold\na,\"calm, content\",steady voice,train\nb,[\"sad\"],,test\nc,x,,train\n")
    out = tmp_path / "g.jsonl"
    code, _ = run_import(["generic", "--annotations", str(csv), "--videos", str(videos), "--out", str(out),
                          "--map", "video_id=clip,labels=emotions", "--map", "description=why,split=fold"], capsys)
    assert code == 0
    rows = manifest_rows(out)
    assert [(r["video_id"], r["labels"], r["split"]) for r in rows] == [("a", ["calm", "content"], "train"),
                                                                       ("b", ["sad"], "test")]
    assert rows[0]["description"] == "steady voice"
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text('{"id": "a", "path": "a.mp4", "emo": ["joy"]}\nnot json\n')
    code, _ = run_import(["generic", "--annotations", str(jsonl), "--videos", str(videos), "--out",
                          str(tmp_path / "j.jsonl"), "--map", "video_id=id,uri=path,labels=emo"], capsys)
    assert code == 0 and manifest_rows(tmp_path / "j.jsonl")[0]["uri"] == str(videos / "a.mp4")
    code, cap = run_import(["generic", "--annotations", str(csv), "--videos", str(videos), "--out", str(out),
                            "--map", "labels=emotions"], capsys)
    assert code == 2 and "video_id" in cap.err


@pytest.mark.integration
def test_meld_dialogue_mode_joins_synth_clips_with_exact_segments(corpus, tmp_path, capsys):
    """Synth clips renamed to MELD's layout: one joined video per dialogue, each utterance's
    segment starting on the frame where its clip starts (checked on decoded frames)."""
    corpus_dir, _, _ = corpus
    truths = [json.loads(x) for x in (corpus_dir / "truth.jsonl").read_text().splitlines()]
    videos = tmp_path / "dev_splits_complete"
    videos.mkdir()
    layout = [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    lines = []
    for (d, u), t in zip(layout, truths):
        shutil.copy(corpus_dir / "videos" / f"{t['video_id']}.mp4", videos / f"dia{d}_utt{u}.mp4")
        text = t["utterances"][0]["text"]
        lines.append(f'{len(lines) + 1},"{text}",Speaker{d},joy,positive,{d},{u},1,1,"0:00:0{u},000","0:00:0{u},900"\n')
    csv = tmp_path / "dev_sent_emo.csv"
    csv.write_text(MELD_HEADER + "".join(lines))
    out = tmp_path / "dialogues.jsonl"
    code, _ = run_import(["meld", "--mode", "dialogue", "--annotations", str(csv), "--videos", str(videos),
                          "--out", str(out), "--split", "val"], capsys)
    assert code == 0
    m = read_manifest(out, strict=True)
    assert [e.video_id for e in m.entries] == ["val_dia0", "val_dia1"]
    first = m.entries[0]
    assert len(first.utterances) == 3 and first.utterances[0].start_s == 0.0
    cap = cv2.VideoCapture(first.uri)
    joined = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        joined.append(f.astype(np.float32))
    for k, utt in enumerate(first.utterances):
        src = cv2.VideoCapture(str(videos / f"dia0_utt{k}.mp4"))
        _, first_frame = src.read()
        n_src = int(src.get(cv2.CAP_PROP_FRAME_COUNT))
        start = int(round(utt.start_s * 25))
        assert utt.end_s - utt.start_s == pytest.approx(n_src / 25, abs=1 / 25)
        diffs = [np.abs(joined[i] - first_frame).mean() if 0 <= i < len(joined) else np.inf
                 for i in range(start - 1, start + 2)]
        assert int(np.argmin(diffs)) == 1 and diffs[1] < 3.0, f"utterance {k}: {diffs}"
    assert len(joined) == int(round(first.utterances[-1].end_s * 25))
    info = subprocess.run(["ffprobe", "-v", "error", "-show_streams", "-of", "json", first.uri],
                          capture_output=True, text=True, check=True).stdout
    assert {s["codec_type"] for s in json.loads(info)["streams"]} == {"video", "audio"}
