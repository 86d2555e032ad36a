"""The rendered corpus checked against its own ground truth with independent tools:
ffprobe for the containers, dlib for faces, decoded audio energy for utterance times and a
clean re-render for micro-event times. Real espeak-ng and ffmpeg throughout."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from jobs.cli import main
from media import decode_audio, decode_frames, ffprobe
from pipeline.faces import DlibFaceDetector
from pipeline.srt import parse_srt
from pipeline.synth.corpus import SynthConfig, generate_corpus, read_jsonl
from pipeline.synth.render import ClipRenderer, FaceRig, Scene

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def rows(corpus):
    out, _, _ = corpus
    return read_jsonl(out / "manifest.jsonl"), read_jsonl(out / "truth.jsonl")


def test_videos_are_h264_aac_25fps_with_the_stated_length(corpus, rows):
    out, cfg, summary = corpus
    manifest, truth = rows
    assert summary["videos"] == len(manifest) == len(truth) == cfg.videos
    for m, t in zip(manifest, truth):
        info = ffprobe(out / m["uri"])
        streams = {s["codec_type"]: s for s in info["streams"]}
        assert streams["video"]["codec_name"] == "h264" and streams["audio"]["codec_name"] == "aac"
        assert streams["video"]["r_frame_rate"] == "25/1"
        assert (streams["video"]["width"], streams["video"]["height"]) == (cfg.width, cfg.height)
        assert int(streams["video"]["nb_frames"]) == t["n_frames"]
        assert 3.0 <= t["duration_s"] <= 10.0 + 0.04
        assert float(info["format"]["duration"]) == pytest.approx(t["duration_s"], abs=0.05)
        assert 1 <= len(t["utterances"]) <= 4


def test_a_face_detector_finds_the_face(corpus, rows):
    out, _, _ = corpus
    detector = DlibFaceDetector(upsample=0, landmarks=False)
    hits = total = 0
    for m in rows[0]:
        for frame in decode_frames(out / m["uri"])[::15]:
            total += 1
            hits += bool(detector.detect(frame))
    assert total >= 12 and hits / total >= 0.85, f"face found in {hits}/{total} frames"


def test_speech_is_where_the_utterance_times_say(corpus, rows):
    out, _, _ = corpus
    rate, hop = 16000, 160  # 10 ms windows
    for m, t in zip(*rows):
        audio = decode_audio(out / m["uri"], rate)
        assert audio.size / rate == pytest.approx(t["duration_s"], abs=0.05)
        rms = np.sqrt(np.mean(audio[: audio.size // hop * hop].reshape(-1, hop) ** 2, axis=1))
        loud = rms > 0.05 * rms.max()
        speech = np.zeros_like(loud)
        for u in t["utterances"]:
            s, e = int(u["start_s"] * 100), int(np.ceil(u["end_s"] * 100))
            speech[s:e] = True
            # the first loud window is at the stated start, within 30 ms
            onset = s - 5 + int(np.argmax(loud[max(0, s - 5): s + 10]))
            assert abs(onset - s) <= 3, f"{t['video_id']} utterance {u['index']}: onset {onset * 10} ms vs {s * 10} ms"
        # outside utterances (with 30 ms of slack for the codec) it is silent
        slack = np.convolve(speech, np.ones(7), mode="same") > 0
        assert not loud[~slack].any(), f"{t['video_id']}: sound outside the stated utterances"
        assert loud[speech].mean() > 0.6


def test_micro_events_are_where_the_ground_truth_says(corpus, rows, identities):
    """Decoded frames minus a clean re-render without events: the difference inside an event's
    box rises within its stated interval and stays at codec noise elsewhere."""
    out, _, _ = corpus
    by_name = {i.name: i for i in identities}
    checked = 0
    for m, t in zip(*rows):
        events = [e for e in t["micro_events"]]
        if not events:
            continue
        frames = decode_frames(out / m["uri"])
        renderer = ClipRenderer(FaceRig(by_name[t["identity"]]), Scene(**t["scene"]), t["fps"])
        times = np.arange(len(frames)) / t["fps"]
        for ev in events:
            x0, y0, x1, y1 = (int(round(v)) for v in ev["bbox_px"])
            diff = np.array([
                np.abs(f[y0:y1, x0:x1].astype(np.float32)
                       - renderer.frame(i, [], t["mouth_open"][i])[y0:y1, x0:x1]).mean()
                for i, f in enumerate(frames)])
            inside = (times > ev["onset_s"]) & (times < ev["offset_s"])
            quiet = np.ones_like(inside)
            for other in events:
                away = (times < other["onset_s"] - 0.04) | (times > other["offset_s"] + 0.04)
                quiet &= away
                if other is not ev:  # another event may move pixels in this box too
                    diff = np.where(away, diff, 0.0)
            peak_t = times[int(np.argmax(diff))]
            assert ev["onset_s"] <= peak_t <= ev["offset_s"], f"{t['video_id']} {ev['kind']}: peak {peak_t}"
            assert diff[inside].max() > 2.0 * np.median(diff[quiet]) + 0.5, f"{t['video_id']} {ev['kind']}"
            checked += 1
    assert checked >= 3


def test_manifest_matches_truth_and_sidecars(corpus, rows):
    out, _, _ = corpus
    for m, t in zip(*rows):
        assert m["video_id"] == t["video_id"] and m["split"] == t["split"] and m["labels"] == t["labels"]
        times = [(u["start_s"], u["end_s"]) for u in t["utterances"]]
        assert [(u["start_s"], u["end_s"]) for u in m["utterance_labels"]] == times
        if t["utterance_source"] == "inline":
            assert [(u["start_s"], u["end_s"], u["text"]) for u in m["utterances"]] == \
                   [(*x, u["text"]) for x, u in zip(times, t["utterances"])]
        elif t["utterance_source"] == "srt":
            cues = parse_srt((out / m["srt"]).read_text())
            assert [(c.start_s, c.end_s, c.text) for c in cues] == \
                   [(*x, u["text"]) for x, u in zip(times, t["utterances"])]
        else:
            assert "utterances" not in m and "srt" not in m
        for ev in t["micro_events"]:
            if ev["emotional"]:
                assert f"{ev['onset_s']:.2f}-{ev['offset_s']:.2f} s" in m["description"]


def test_same_seed_same_bytes_and_reruns_reuse_finished_clips(corpus, rows, tmp_path):
    out, cfg, _ = corpus
    small = SynthConfig(out=str(tmp_path), videos=2, seed=cfg.seed, workers=1)
    summary = generate_corpus(small, progress=False)
    assert summary["generated"] == 2
    again = read_jsonl(tmp_path / "manifest.jsonl")
    assert again == rows[0][:2]

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for m in again:
        assert digest(tmp_path / m["uri"]) == digest(out / m["uri"])
    # a rerun renders nothing; a lost video is rendered again, alone
    assert generate_corpus(small, progress=False)["generated"] == 0
    (tmp_path / again[1]["uri"]).unlink()
    assert generate_corpus(small, progress=False)["generated"] == 1
    assert digest(tmp_path / again[1]["uri"]) == digest(out / again[1]["uri"])
    # another seed is another corpus
    other = SynthConfig(out=str(tmp_path / "other"), videos=1, seed=cfg.seed + 1, workers=1)
    generate_corpus(other, progress=False)
    assert read_jsonl(tmp_path / "other" / "manifest.jsonl")[0] != again[0]


def test_synth_command_writes_config_and_summary(tmp_path, capsys, tools):
    assert main(["synth", "--out", str(tmp_path), "--videos", "1", "--seed", "5", "-q", "blinks_per_minute=0"]) == 0
    captured = capsys.readouterr()
    assert "resolved config" in captured.err and "blinks_per_minute: 0.0" in captured.err
    assert "1 clips" in captured.out and "wrote" in captured.out
    assert "blinks_per_minute: 0.0" in (tmp_path / "config.yaml").read_text()
    assert json.loads((tmp_path / "corpus.json").read_text())["blinks"] == 0
