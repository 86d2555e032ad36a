"""ffmpeg decoding on real files: exact timestamps, windows, audio, and every kind of bad input."""

import math

import numpy as np
import pytest

from media import decode_frames
from pipeline.decode import DecodeConfig, DecodeError, decode_audio, iter_samples, probe
from pipeline.synth.corpus import read_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def clip(corpus):
    out, _, _ = corpus
    truth = read_jsonl(out / "truth.jsonl")[1]
    return out / "videos" / f"{truth['video_id']}.mp4", truth


def test_probe_reads_the_facts(clip):
    path, truth = clip
    info = probe(path)
    assert (info.width, info.height, info.fps) == (truth["width"], truth["height"], 25.0)
    assert info.has_video and info.has_audio and info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.duration_s == pytest.approx(truth["duration_s"], abs=0.05)


def test_samples_sit_on_exact_frame_times_with_full_rate_windows(clip):
    path, truth = clip
    cfg = DecodeConfig(sample_fps=2.0, window_s=0.4)
    samples = list(iter_samples(probe(path), cfg))
    n_frames = truth["n_frames"]
    assert len(samples) == math.ceil((n_frames - 0.5) / 12.5)  # k with round(12.5 k) <= N - 1
    frames = decode_frames(path)
    for s in samples:
        n = int(math.floor(s.index * 12.5 + 0.5))
        assert s.pts_s == pytest.approx(n / 25)
        # the sampled image is that very frame
        assert np.abs(s.image.astype(int) - frames[n]).mean() < 1.0
        # the window is every full-rate frame within +-0.2 s, in order, the sample among them
        expect = [i / 25 for i in range(max(0, n - 5), min(n_frames - 1, n + 5) + 1)]
        assert np.allclose(s.window_pts_s, expect)
        assert s.window.shape[1:] == s.image.shape
        assert any(np.array_equal(w, s.image) for w in s.window)


def test_frames_are_scaled_to_max_side(clip):
    path, _ = clip
    s = next(iter_samples(probe(path), DecodeConfig(max_side=200)))
    assert s.image.shape == (150, 200, 3)


def test_audio_is_16k_mono_of_the_clip_length(clip):
    path, truth = clip
    audio = decode_audio(probe(path))
    assert audio.dtype == np.float32
    assert audio.size / 16000 == pytest.approx(truth["duration_s"], abs=0.1)
    first = truth["utterances"][0]
    inside = audio[int(first["start_s"] * 16000): int(first["end_s"] * 16000)]
    assert np.sqrt(np.mean(inside ** 2)) > 20 * np.sqrt(np.mean(audio[: int(first["start_s"] * 16000) - 800] ** 2) + 1e-12)


@pytest.mark.parametrize("name, error_type, stage", [
    ("zero_byte", "empty_file", "probe"),
    ("text_as_mp4", "corrupt", "probe"),
    ("playlist_as_mp4", "corrupt", "probe"),
    ("missing", "missing_file", "probe"),
    ("truncated", "truncated", "frames"),
    ("audio_only", "no_video_stream", "frames"),
])
def test_bad_inputs_raise_typed_errors(bad_inputs, name, error_type, stage):
    with pytest.raises(DecodeError) as exc:
        info = probe(bad_inputs[name])
        assert stage == "frames", "probe should have refused it"
        list(iter_samples(info))
    assert exc.value.error_type == error_type
    assert bad_inputs[name].name in str(exc.value)


def test_video_without_audio_decodes_frames_and_empty_audio(bad_inputs):
    info = probe(bad_inputs["no_audio"])
    assert info.has_video and not info.has_audio
    assert len(list(iter_samples(info))) > 3
    assert decode_audio(info).size == 0


@pytest.mark.parametrize("cfg, error_type", [
    (DecodeConfig(max_duration_s=1.0), "too_long"),
    (DecodeConfig(max_pixels=100 * 100), "too_large"),
    (DecodeConfig(max_bytes=1000), "too_large"),
])
def test_limits(clip, cfg, error_type):
    with pytest.raises(DecodeError) as exc:
        probe(clip[0], cfg)
    assert exc.value.error_type == error_type


def test_timeout_kills_ffmpeg(clip):
    info = probe(clip[0])
    with pytest.raises(DecodeError) as exc:
        list(iter_samples(info, DecodeConfig(timeout_s=0.001)))
    assert exc.value.error_type == "timeout"
