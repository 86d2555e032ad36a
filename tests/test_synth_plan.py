"""The corpus plan, without rendering: splits, sentences, timing and event scheduling."""

from collections import Counter

import numpy as np
import pytest

from pipeline.synth.corpus import (SPLITS, SynthConfig, explain, layout_speech, plan_clip, schedule_events,
                                   sentence_pool, sentence_split, split_of)
from pipeline.synth.emotions import EMOTIONS, NEUTRAL_VOICE, NON_NEUTRAL, sentence_space
from pipeline.synth.identities import Identity
from pipeline.synth.speech import SAMPLE_RATE


def fake_identities(n=3):
    # plan_clip only reads the count and each identity's voice; no photo needed
    return [Identity(f"id{k}", "test", np.zeros((4, 4, 3), np.uint8), np.zeros((68, 2), np.float32), 150.0,
                     f"en-us+m{k + 1}") for k in range(n)]


def test_every_split_is_present_from_three_clips_on():
    for seed in range(20):
        assert {split_of(i, seed, (0.7, 0.15, 0.15)) for i in range(3)} == set(SPLITS)


def test_split_ratios_hold_and_do_not_depend_on_corpus_size():
    splits = [split_of(i, 0, (0.7, 0.15, 0.15)) for i in range(400)]
    c = Counter(splits)
    assert c == {"train": 280, "val": 60, "test": 60}
    assert splits[:50] == [split_of(i, 0, (0.7, 0.15, 0.15)) for i in range(50)]


def test_sentence_pools_are_disjoint_across_splits_and_cover_the_space():
    ratios = (0.7, 0.15, 0.15)
    for emotion in EMOTIONS:
        pools = [set(sentence_pool(emotion, s, ratios)) for s in SPLITS]
        assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
        assert set().union(*pools) == set(sentence_space(emotion))
        assert all(len(p) > 50 for p in pools)
    assert sentence_split("x", (1, 0, 0)) == "train"


def plans(n=300, **over):
    cfg = SynthConfig(**over)
    ids = fake_identities()
    return [plan_clip(cfg, i, ids, np.random.default_rng([cfg.seed, i])) for i in range(n)]


def test_plans_cover_emotions_modes_and_sources():
    ps = plans()
    assert {p.emotion for p in ps} == set(EMOTIONS)
    assert {p.mode for p in ps} == {"all", "face_only", "voice_only", "text_only", "neutral"}
    assert {p.source for p in ps} == {"inline", "srt", "none"}
    assert {len(p.utterances) for p in ps} == {1, 2, 3, 4}


def test_channels_decide_words_and_voice():
    for p in plans():
        ch = p.channels
        for u in p.utterances:
            neutral_text = u.text in set(sentence_space("neutral"))
            if u.emotional and ch["text"]:
                assert not neutral_text
            else:
                assert neutral_text
            if u.emotional and ch["voice"]:
                assert u.voice.amplitude == EMOTIONS[p.emotion].voice.amplitude != NEUTRAL_VOICE.amplitude
            else:
                assert u.voice.amplitude == NEUTRAL_VOICE.amplitude
        assert p.labels[0] == p.emotion and p.labels[1] in EMOTIONS[p.emotion].vocabulary
        if p.emotion == "neutral":
            assert not any(ch.values()) and not any(u.emotional for u in p.utterances)
        else:
            assert any(u.emotional for u in p.utterances)


def test_face_only_and_voice_only_clips_are_common():
    modes = Counter(p.mode for p in plans())
    non_neutral = sum(v for k, v in modes.items() if k != "neutral")
    assert modes["face_only"] > 0.1 * non_neutral and modes["voice_only"] > 0.1 * non_neutral


def _speech(seconds):
    return np.ones(int(seconds * SAMPLE_RATE), np.int16)


@pytest.mark.parametrize("lengths", [[0.8], [2.0, 2.5, 1.5], [3.0, 3.0, 3.0, 3.0]])
def test_layout_keeps_clips_within_3_to_10_seconds_on_whole_frames(lengths):
    cfg = SynthConfig()
    track, times, n_frames = layout_speech([_speech(x) for x in lengths], np.random.default_rng(0), cfg)
    duration = n_frames / cfg.fps
    assert 3.0 <= duration <= 10.0 + 1 / cfg.fps
    assert track.size == round(duration * SAMPLE_RATE)
    assert 1 <= len(times) <= len(lengths)
    for (s, e), x in zip(times, lengths):
        assert e - s == pytest.approx(x, abs=1e-3)
        # the samples really are where the times say
        assert track[int(s * SAMPLE_RATE) + 5] == 1 and track[max(0, int(s * SAMPLE_RATE) - 5)] == 0
    assert all(a[1] < b[0] for a, b in zip(times, times[1:]))


def test_events_sit_inside_emotional_utterances_and_never_overlap():
    cfg = SynthConfig()
    checked = 0
    for p in plans(200):
        rng = np.random.default_rng(p.index)
        times, t = [], 0.4
        for _ in p.utterances:
            times.append((round(t, 3), round(t + 2.0, 3)))
            t += 2.6
        dur = t + 0.3
        events = schedule_events(p, times, dur, cfg, rng)
        emotional = [e for e in events if e["emotional"]]
        assert bool(emotional) == p.channels["face"]
        for e in emotional:
            assert e["kind"] in EMOTIONS[p.emotion].actions
            assert 0.1 <= e["duration_s"] <= 0.4
            u = e["utterance"]
            assert u is not None and p.utterances[u].emotional
            assert times[u][0] <= e["onset_s"] and e["offset_s"] <= times[u][1] + 1e-9
            checked += 1
        for a, b in zip(events, events[1:]):
            assert a["offset_s"] + 0.2 <= b["onset_s"] + 1e-9
    assert checked > 50


def test_explanation_names_clues_with_times():
    cfg = SynthConfig()
    p = next(p for p in plans() if p.mode == "face_only")
    times = [(0.5 + 3 * k, 2.5 + 3 * k) for k in range(len(p.utterances))]
    events = schedule_events(p, times, 3.0 * len(times) + 0.5, cfg, np.random.default_rng(0))
    text = explain(p, times, events)
    ev = next(e for e in events if e["emotional"])
    assert f"{ev['onset_s']:.2f}-{ev['offset_s']:.2f} s" in text
    assert "Only the face reveals" in text and p.labels[0] in text
    assert p.utterances[0].text in text


def test_non_neutral_emotions_all_have_face_actions_and_distinct_voices():
    voices = {EMOTIONS[e].voice for e in NON_NEUTRAL}
    assert len(voices) == len(NON_NEUTRAL) and NEUTRAL_VOICE not in voices
    assert all(EMOTIONS[e].actions for e in NON_NEUTRAL)
