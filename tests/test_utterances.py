"""Utterances from the manifest, an SRT sidecar, or VAD + ASR: real Silero VAD, real Whisper
tiny.en (from the installed packages), real espeak-ng speech from the synthetic corpus."""

from __future__ import annotations

import json
import re
import socket
import time

import numpy as np
import pytest

from pipeline.manifest import ManifestEntry, Utterance
from pipeline.srt import Cue, format_srt
from pipeline.utterances import (AsrConfig, UtteranceError, _Vad, _silero_dir, load_whisper, speech_regions,
                                 utterances_for)

SR = 16000


def _norm(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def _edits(ref: list[str], hyp: list[str]) -> int:
    d = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, d[0] = d[:], i
        for j, h in enumerate(hyp, 1):
            d[j] = min(prev[j] + 1, d[j - 1] + 1, prev[j - 1] + (r != h))
    return d[-1]


@pytest.fixture(scope="module")
def clips(corpus):
    """(truth row, 16 kHz audio) for every synth clip with at least one utterance."""
    from pipeline.decode import decode_audio, probe

    out, _, _ = corpus
    rows = [json.loads(line) for line in (out / "truth.jsonl").read_text().splitlines() if line.strip()]
    got = [(r, decode_audio(probe(out / "videos" / f"{r['video_id']}.mp4"))) for r in rows if r["utterances"]]
    assert len(got) >= 2
    return got


@pytest.fixture(scope="module")
def asr_run(clips):
    """utterances_for on every clip with no inline utterances and no SRT, timed."""
    load_whisper()  # load the models once, outside the timings
    speech_regions(clips[0][1])
    results, t_vad, t_all, dur = [], 0.0, 0.0, 0.0
    for truth, audio in clips:
        t = time.perf_counter()
        speech_regions(audio)
        t_vad += time.perf_counter() - t
        t = time.perf_counter()
        got = utterances_for(ManifestEntry(1, truth["video_id"]), audio)
        t_all += time.perf_counter() - t
        dur += audio.size / SR
        results.append((truth, got))
    return results, {"audio_s": dur, "vad_rtf": t_vad / dur, "asr_rtf": (t_all - t_vad) / dur}


# ---------------------------------------------------------------------------- given sources

def test_inline_utterances_sorted_reindexed_clipped():
    audio = np.zeros(int(2.5 * SR), np.float32)
    entry = ManifestEntry(1, "v", utterances=[Utterance(0, 2.0, 3.0, " later ", "B"),
                                              Utterance(1, 0.5, 1.0, "first", "A"),
                                              Utterance(2, 2.6, 2.9, "past the end")])
    got = utterances_for(entry, audio, cfg=AsrConfig(model_dir="/nonexistent"))  # no model needed
    assert [(u.index, u.start_s, u.end_s, u.text, u.speaker, u.source) for u in got] == [
        (0, 0.5, 1.0, "first", "A", "manifest"), (1, 2.0, 2.5, "later", "B", "manifest")]
    # an explicit empty list means "no speech": no ASR
    assert utterances_for(ManifestEntry(1, "v", utterances=[]), audio) == []
    # no audio track: times are kept as given
    assert [u.end_s for u in utterances_for(entry, None)] == [1.0, 3.0, 2.9]


def test_srt_sidecar(tmp_path):
    path = tmp_path / "v.srt"
    path.write_text(format_srt([Cue(3.2, 4.5, "Second line"), Cue(0.25, 1.75, "Hello there,\nfriend")]),
                    encoding="utf-8")
    got = utterances_for(ManifestEntry(1, "v", srt=str(path)), np.zeros(5 * SR, np.float32))
    assert [(u.index, u.start_s, u.end_s, u.text, u.source) for u in got] == [
        (0, 0.25, 1.75, "Hello there, friend", "srt"), (1, 3.2, 4.5, "Second line", "srt")]
    # inline utterances win over the sidecar
    entry = ManifestEntry(1, "v", srt=str(path), utterances=[Utterance(0, 1.0, 2.0, "inline")])
    assert [u.source for u in utterances_for(entry, None)] == ["manifest"]


def test_bad_and_missing_srt(tmp_path):
    bad = tmp_path / "bad.srt"
    bad.write_text("1\n00:00:01,000 --> 00:00:02,000\nok\n\n2\nnot a time line\nhello\n")
    with pytest.raises(UtteranceError) as err:
        utterances_for(ManifestEntry(1, "v", srt=str(bad)), None)
    assert err.value.error_type == "bad_srt" and str(bad) in str(err.value) and "cue 2" in str(err.value)
    binary = tmp_path / "binary.srt"
    binary.write_bytes(b"1\n00:00:01,000 --> 00:00:02,000\n\xff\xfe\x00bad\n")
    with pytest.raises(UtteranceError, match="not UTF-8") as err:
        utterances_for(ManifestEntry(1, "v", srt=str(binary)), None)
    assert err.value.error_type == "bad_srt"
    missing = tmp_path / "missing.srt"
    with pytest.raises(UtteranceError) as err:
        utterances_for(ManifestEntry(1, "v", srt=str(missing)), None)
    assert err.value.error_type == "missing_srt" and str(missing) in str(err.value)


@pytest.mark.integration
def test_srt_from_s3():
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        import s3fs

        opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}",
                                                                   "region_name": "eu-west-1"}}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("subs")
        fs.pipe("subs/v.srt", format_srt([Cue(0.5, 1.5, "from the bucket")]).encode())
        got = utterances_for(ManifestEntry(1, "v", srt="s3://subs/v.srt"), None, storage_options=opts)
        assert [(u.start_s, u.end_s, u.text, u.source) for u in got] == [(0.5, 1.5, "from the bucket", "srt")]
        with pytest.raises(UtteranceError) as err:
            utterances_for(ManifestEntry(1, "v", srt="s3://subs/none.srt"), None, storage_options=opts)
        assert err.value.error_type == "missing_srt" and "s3://subs/none.srt" in str(err.value)
    finally:
        server.stop()


# ---------------------------------------------------------------------------- VAD + ASR

@pytest.mark.integration
def test_asr_matches_truth(asr_run):
    results, timing = asr_run
    errors, edits, words, n_true = [], 0, 0, 0
    for truth, got in results:
        assert all(u.source == "asr" and u.end_s > u.start_s for u in got)
        assert [u.index for u in got] == list(range(len(got)))
        assert [u.start_s for u in got] == sorted(u.start_s for u in got)
        for t in truth["utterances"]:
            n_true += 1
            match = [u for u in got if abs(u.start_s - t["start_s"]) <= 0.25 and abs(u.end_s - t["end_s"]) <= 0.25]
            assert match, f"{truth['video_id']}: {t['start_s']}-{t['end_s']} not found in " \
                          f"{[(u.start_s, u.end_s) for u in got]}"
            u = match[0]
            errors += [abs(u.start_s - t["start_s"]), abs(u.end_s - t["end_s"])]
            ref = _norm(t["text"])
            edits += _edits(ref, _norm(u.text))
            words += len(ref)
        assert len(got) == len(truth["utterances"]), f"{truth['video_id']}: spurious utterances {got}"
    wer = edits / words
    print(f"\nASR on {len(results)} synth clips ({timing['audio_s']:.1f} s audio, {n_true} utterances): "
          f"mean |boundary error| {np.mean(errors) * 1000:.1f} ms (max {np.max(errors) * 1000:.0f} ms), "
          f"WER {wer:.3f}; VAD {timing['vad_rtf']:.4f} s/s, ASR {timing['asr_rtf']:.3f} s/s")
    assert np.mean(errors) < 0.1
    assert wer < 0.5


@pytest.mark.integration
def test_silence_gives_nothing():
    assert utterances_for(ManifestEntry(1, "v"), np.zeros(5 * SR, np.float32)) == []
    hiss = np.random.default_rng(0).normal(0, 1e-3, 5 * SR).astype(np.float32)
    assert utterances_for(ManifestEntry(1, "v"), hiss) == []
    assert utterances_for(ManifestEntry(1, "v"), np.zeros(0, np.float32)) == []
    assert utterances_for(ManifestEntry(1, "v"), None) == []


@pytest.mark.integration
def test_other_rates_and_integer_pcm(clips, asr_run):
    from scipy.signal import resample_poly

    (_, audio), (_, at_16k) = clips[0], asr_run[0][0]
    pcm = (resample_poly(audio, 3, 1) * 32767).clip(-32768, 32767).astype(np.int16)  # 48 kHz int16
    got = utterances_for(ManifestEntry(1, "v"), pcm, sample_rate=48000)
    assert len(got) == len(at_16k)
    for a, b in zip(got, at_16k):
        assert abs(a.start_s - b.start_s) <= 0.02 and abs(a.end_s - b.end_s) <= 0.02


def _long_speech(clips, pauses: bool) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """All clips back to back (with their pauses), or all utterances butted together (none)."""
    pieces, spans, t = [], [], 0.0
    for truth, audio in clips:
        if pauses:
            pieces.append(audio)
            spans += [(t + u["start_s"], t + u["end_s"]) for u in truth["utterances"]]
            t += audio.size / SR
        else:
            for u in truth["utterances"]:
                seg = audio[int(u["start_s"] * SR): int(u["end_s"] * SR)]
                pieces.append(seg)
                spans.append((t, t + seg.size / SR))
                t += seg.size / SR
    return np.concatenate(pieces), spans


@pytest.mark.integration
def test_long_speech_is_split_at_pauses(clips):
    audio, spans = _long_speech(clips, pauses=True)
    cfg = AsrConfig(min_silence_s=2.0, max_utterance_s=10.0)  # pauses alone would not separate them
    regions = speech_regions(audio, cfg)
    assert len(regions) >= int(np.ceil((spans[-1][1] - spans[0][0]) / 10.0))
    assert all(e - s <= 10.0 + 1e-9 for s, e in regions)
    # every cut is in a pause between utterances, not inside one
    for s, e in regions:
        for a, b in spans:
            assert not (a + 0.05 < s < b - 0.05) and not (a + 0.05 < e < b - 0.05), (s, e, a, b)
    got = utterances_for(ManifestEntry(1, "long"), audio, cfg=cfg)
    assert len(got) == len(regions) and all(u.end_s - u.start_s <= 10.0 for u in got)
    assert all(u.text for u in got)


@pytest.mark.integration
def test_continuous_speech_is_hard_cut(clips):
    audio, spans = _long_speech(clips, pauses=False)
    cfg = AsrConfig(max_utterance_s=6.0)
    regions = speech_regions(audio, cfg)
    assert all(e - s <= 6.0 + 1e-9 for s, e in regions)
    covered = sum(e - s for s, e in regions)
    assert covered >= 0.9 * audio.size / SR
    assert len(regions) >= int(np.ceil(audio.size / SR / 6.0))


# ---------------------------------------------------------------------------- models

@pytest.mark.integration
def test_streaming_vad_fallback_agrees(clips):
    """The batched 'sequence' export and the streaming silero_vad.onnx give the same probabilities."""
    audio = clips[0][1]
    seq, stream = _Vad(_silero_dir(), sequence=True), _Vad(_silero_dir(), sequence=False)
    assert seq.sequence and not stream.sequence
    np.testing.assert_allclose(seq.probs(audio), stream.probs(audio), atol=1e-4)


@pytest.mark.integration
def test_vad_leaves_torch_threads_alone(clips):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    speech_regions(clips[0][1])
    assert torch.get_num_threads() == before


@pytest.mark.integration
def test_missing_model_is_a_clear_error(tmp_path, clips):
    audio = clips[0][1]
    for model_dir, what in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "lacks model.bin")):
        with pytest.raises(UtteranceError) as err:
            utterances_for(ManifestEntry(1, "v"), audio, cfg=AsrConfig(model_dir=str(model_dir)))
        msg = str(err.value)
        assert err.value.error_type == "asr_unavailable" and str(model_dir) in msg and what in msg
        assert "model_dir" in msg and "nothing is downloaded" in msg


@pytest.mark.integration
def test_model_from_a_remote_prefix(tmp_path, monkeypatch, clips):
    """A model under an fsspec URL (s3:// in production; memory:// here) is copied to the cache once."""
    import fsspec

    from pipeline.utterances import default_model_dir

    monkeypatch.setenv("MICROEMO_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    for f in default_model_dir().iterdir():
        if f.is_file():
            fs.pipe(f"/models/tiny/{f.name}", f.read_bytes())
    try:
        cfg = AsrConfig(model_dir="memory://models/tiny")
        assert load_whisper(cfg) is not load_whisper()
        cached = list((tmp_path / "cache" / "models").iterdir())
        assert len(cached) == 1 and (cached[0] / "model.bin").is_file() and (cached[0] / ".complete").is_file()
        truth, audio = clips[0]
        got = utterances_for(ManifestEntry(1, "v"), audio, cfg=cfg)
        assert len(got) == len(truth["utterances"]) and all(u.text for u in got)
    finally:
        fs.rm("/models", recursive=True)
