"""EMER metrics (jobs/emer.py): hand-computed set scores, grouping, lexicon files, label
extraction, clue timing, per-utterance matching and the by-mode breakdown."""

import json

import pytest

from jobs.emer import (LEVELS, LabelMatcher, Lexicon, clue_hits, clue_times, extract_labels, scan_labels,
                       score_clips)
from pipeline.synth.emotions import EMOTIONS

# Reference explanation as pipeline/synth/corpus.py::explain writes it (face-only clip).
SYNTH_EXPLANATION = ('In the video, at 1.20-1.45 s the brows draw together and down. In the audio, the voice is '
                     'even, at a steady rate and pitch. At 0.53-2.70 s the speaker says "The schedule changed this '
                     'week." The words themselves are neutral. Only the face reveals the emotion: the speaker is '
                     'annoyed, irritated.')
TRANSCRIPT = [{"start_s": 0.53, "end_s": 2.70, "text": "The schedule changed this week."}]


@pytest.fixture(scope="module")
def matcher():
    return LabelMatcher(Lexicon.load(), embedder=None)


def score(matcher, pred_labels, ref_labels, **kw):
    """Report for one clip whose prediction and reference are label lists."""
    return score_clips([{"video_id": "v", "labels": pred_labels}], [{"video_id": "v", "labels": ref_labels}],
                       matcher, **kw)


# ------------------------------------------------------------------------------------ set scores

def test_exact_match_scores_one_at_every_level(matcher):
    report = score(matcher, ["happy"], ["happy"])
    assert report["n_clips"] == 1
    for level in LEVELS:
        assert report[level] == {"accuracy": 1.0, "recall": 1.0, "score": 1.0}


def test_synonyms_match_in_their_group_but_not_exactly(matcher):
    # joyful and happy are both joy/cheerfulness: G = P = {joy/cheerfulness} -> 1/1, 1/1
    report = score(matcher, ["joyful"], ["happy"])
    assert (report["accuracy"], report["recall"], report["score"]) == (1.0, 1.0, 1.0)
    # exact: G = {happy}, P = {joyful} -> 0/1, 0/1
    assert report["exact"] == {"accuracy": 0.0, "recall": 0.0, "score": 0.0}


@pytest.mark.parametrize("forms", [
    ("angry", "anger", "angered", "angrily"),
    ("happy", "happiness", "happily"),
    ("sad", "sadness", "sadly"),
    ("fearful", "fear", "fearfully"),
    ("surprised", "surprise", "surprising"),
    ("annoyed", "annoyance", "annoying"),
    ("frustrated", "frustration", "frustrating"),
    ("disgusted", "disgust", "disgusting"),
    ("worried", "worry", "worrying"),
])
def test_inflections_share_a_group(matcher, forms):
    groups = {matcher.group(f) for f in forms}
    assert len(groups) == 1 and None not in groups and "/" in groups.pop()


@pytest.mark.parametrize("word", ["happened", "passing", "affected", "wearing", "scarred", "pits", "element",
                                  "contention", "hats", "business"])
def test_suffix_rules_leave_ordinary_words_alone(word):
    # stems that merely look like emotion words: happ-y, pass-ion, affect-ion, wear-y, scar-ed, pit-y, ...
    assert Lexicon.load().head(word) is None


def test_inflected_labels_score_as_matches(matcher):
    # angry -> anger/rage, anger -> anger/rage: 1/1, 1/1
    assert score(matcher, ["angry"], ["anger"])["score"] == 1.0


def test_every_synthetic_corpus_label_is_in_the_lexicon():
    lex = Lexicon.load()
    missing = [w for e in EMOTIONS.values() for w in e.vocabulary if lex.head(w) is None]
    assert missing == []
    # and each lands under the right primary (disgust is a kind of anger in Parrott's tree)
    primary = {"happy": "joy", "sad": "sadness", "angry": "anger", "surprised": "surprise", "fearful": "fear",
               "disgusted": "anger", "neutral": "neutral"}
    for name, emotion in EMOTIONS.items():
        assert {lex.words[lex.head(w)][0] for w in emotion.vocabulary} == {primary[name]}, name


def test_unknown_word_is_its_own_group(matcher):
    assert matcher.group("xyzzy") == "xyzzy" and matcher.group("xyzzy", "coarse") == "xyzzy"
    # P = {xyzzy, joy/cheerfulness}, G = {joy/cheerfulness}: accuracy 1/2, recall 1/1, score 0.75
    report = score(matcher, ["xyzzy", "happy"], ["happy"])
    assert (report["accuracy"], report["recall"], report["score"]) == (0.5, 1.0, 0.75)
    # an unknown word equals itself (after case folding) and nothing else
    assert score(matcher, ["Zorbish"], ["zorbish"])["score"] == 1.0
    assert score(matcher, ["zorbish"], ["blorbish"])["score"] == 0.0


def test_negated_and_antonym_labels_join_no_group(matcher):
    assert matcher.group("not happy") == "not happy"
    assert matcher.group("fearless") == "fearless"


def test_empty_prediction_scores_zero(matcher):
    preds = [{"video_id": "a", "labels": []}, {"video_id": "b", "labels": ["sad"]},
             {"video_id": "c", "text": "The face is still.\nEmotions: unknown"}, {"video_id": "d2", "labels": ["N/A"]}]
    refs = [{"video_id": "a", "labels": ["happy"]}, {"video_id": "b", "labels": ["sad"]},
            {"video_id": "c", "labels": ["angry"]}, {"video_id": "d", "labels": ["calm"]},
            {"video_id": "d2", "labels": ["sad"]}]
    report = score_clips(preds, refs, matcher)
    # a: empty -> 0, 0; b: 1, 1; c: "unknown" is a placeholder, the explanation names nothing -> 0, 0;
    # d: no prediction at all -> 0, 0; d2: "N/A" is a placeholder -> 0, 0.
    # accuracy = recall = (0 + 1 + 0 + 0 + 0) / 5 = 0.2
    assert report["n_clips"] == 5 and report["n_missing"] == 1
    assert (report["accuracy"], report["recall"], report["score"]) == (0.2, 0.2, 0.2)
    assert [c["accuracy"] for c in report["clips"]] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert report["clips"][3]["missing"] and not report["clips"][4]["missing"]


def test_empty_reference_is_skipped_and_counted(matcher):
    preds = [{"video_id": "a", "labels": ["happy"]}, {"video_id": "b", "labels": ["sad"]},
             {"video_id": "zz", "labels": ["sad"]}]
    refs = [{"video_id": "a", "labels": []}, {"video_id": "b", "labels": ["sad", "angry"]}]
    report = score_clips(preds, refs, matcher)
    # only b is scored: G = {sadness/sadness, anger/rage}, P = {sadness/sadness}: accuracy 1/1, recall 1/2
    assert report["n_clips"] == 1 and report["n_skipped"] == 1 and report["n_unmatched_predictions"] == 1
    assert (report["accuracy"], report["recall"], report["score"]) == (1.0, 0.5, 0.75)
    assert report["clips"][0]["accuracy"] is None


def test_no_scored_clips_gives_nulls_not_division_errors(matcher):
    report = score_clips([], [{"video_id": "a", "labels": []}], matcher)
    assert report["n_clips"] == 0 and report["accuracy"] is None and report["clue_timing"]["rate"] is None
    json.dumps(report)  # JSON-ready


def test_duplicates_and_synonyms_count_once(matcher):
    report = score(matcher, ["happy", "happy", "joy"], ["happy", "sad"])
    # group: P = {joy/cheerfulness} (|P| = 1), G = {joy/cheerfulness, sadness/sadness}: 1/1, 1/2
    assert report["group"] == {"accuracy": 1.0, "recall": 0.5, "score": 0.75}
    # exact: P = {happy, joy}, G = {happy, sad}: 1/2, 1/2
    assert report["exact"] == {"accuracy": 0.5, "recall": 0.5, "score": 0.5}


def test_case_and_whitespace_do_not_matter(matcher):
    assert matcher.group("  Happy ", "exact") == "happy"
    assert score(matcher, ["  Happy ", "GROSSED-OUT"], ["happy", "grossed out"])["exact"]["score"] == 1.0


def test_coarse_level_merges_what_fine_level_separates(matcher):
    # annoyed: anger/irritability, furious: anger/rage -> fine 0/1, 0/1; coarse anger = anger -> 1/1, 1/1
    report = score(matcher, ["annoyed"], ["furious"])
    assert report["fine"]["score"] == 0.0 and report["coarse"]["score"] == 1.0
    assert report["group"] == report["fine"] == {k: report[k] for k in ("accuracy", "recall", "score")}
    # worried (fear/nervousness) + happy vs scared (fear/horror):
    # fine: P = {fear/nervousness, joy/cheerfulness}, G = {fear/horror} -> 0/2, 0/1
    # coarse: P = {fear, joy}, G = {fear} -> 1/2, 1/1, score 0.75
    report = score(matcher, ["worried", "happy"], ["scared"])
    assert report["fine"]["score"] == 0.0
    assert report["coarse"] == {"accuracy": 0.5, "recall": 1.0, "score": 0.75}


# ------------------------------------------------------------------------------------ lexicon files

def write(path, data):
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_user_lexicon_file(tmp_path):
    path = write(tmp_path / "mine.json", {
        "name": "valence", "tree": {"positive": {"good": ["happy", "glad"]}, "negative": {"bad": ["sad", "angry"]}},
        "forms": {"joyful": "happy"}})
    lex = Lexicon.load(path)
    m = LabelMatcher(lex, embedder=None)
    assert lex.name == "valence" and lex.path == str(path)
    assert m.group("joyful") == "positive/good" and m.group("angrily") == "negative/bad"
    assert m.group("angry", "coarse") == "negative" and m.group("good") == "positive/good"  # group names are words
    assert m.group("fear") == "fear"  # not in this lexicon: its own group
    # happy + sad vs glad: P = {positive/good, negative/bad}, G = {positive/good}: 1/2, 1/1
    report = score(m, ["happy", "sad"], ["glad"])
    assert (report["accuracy"], report["recall"], report["lexicon"]) == (0.5, 1.0, "valence")


@pytest.mark.parametrize("content, problem", [
    ('{"tree": {"joy": {"cheer": ["happy"]}', "not valid JSON"),
    ({"forms": {"x": "y"}}, "missing 'tree'"),
    ({"tree": {"joy": ["happy"]}}, "'tree' must map each primary"),
    ({"tree": {"joy": {"cheer": "happy"}}}, "tree.joy.cheer must be a list of words"),
    ({"tree": {"joy": {"cheer": ["happy"]}, "anger": {"rage": ["Happy"]}}}, "'happy' is in both joy/cheer and anger/rage"),
    ({"tree": {"joy": {"cheer": ["happy"]}}, "forms": {"glad": "gladness"}}, "'gladness', which is not a word"),
    ({"tree": {"joy": {"cheer": ["happy"]}}, "synonyms": {}}, "unknown key(s) ['synonyms']"),
    ([1, 2], "top level must be a JSON object"),
])
def test_malformed_lexicon_names_the_file_and_the_problem(tmp_path, content, problem):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError) as err:
        Lexicon.load(path)
    assert str(path) in str(err.value) and problem in str(err.value)


def test_missing_lexicon_file_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="nope.json: cannot read it"):
        Lexicon.load(tmp_path / "nope.json")


# ------------------------------------------------------------------------------------ labels from text

def test_extract_labels_reads_the_emotions_line():
    text = "At 1.2 s the brows furrow; the speaker looks sad.\nEmotions: Annoyed, irritated\nUtterance 1: annoyed"
    assert extract_labels(text) == ["annoyed", "irritated"]


def test_extract_labels_falls_back_to_the_explanation():
    # face-only synth reference: "neutral" (the words) gives way to the emotion named in the verdict
    assert extract_labels(SYNTH_EXPLANATION) == ["annoyed", "irritated"]
    # a neutral clip: neutral words are all there is
    assert extract_labels("Nothing departs from a steady baseline, so the speaker is neutral and calm.") == \
        ["neutral", "calm"]


def test_label_scan_skips_negations_quotes_and_ambiguous_words():
    text = ('He is not angry, never really sad, and without fear; he isn\'t upset. He says "I am so furious" '
            'and I like that he is happy, then relieved. Happy again.')
    # not angry / never really sad / without fear / isn't upset: negated within 2 tokens;
    # "furious" is quoted speech; "like" is ambiguous; "happy" is listed once
    assert scan_labels(text) == ["happy", "relieved"]
    # a negation does not reach past punctuation or more than 2 tokens
    assert scan_labels("No. Angry.") == ["angry"]
    assert scan_labels("not at all clearly angry") == ["angry"]


# ------------------------------------------------------------------------------------ clue timing

def test_clue_times_drop_utterance_spans():
    assert clue_times(SYNTH_EXPLANATION) == [(1.2, 1.45), (0.53, 2.7)]
    assert clue_times(SYNTH_EXPLANATION, TRANSCRIPT) == [(1.2, 1.45)]
    # a clue inside a short utterance is kept: the utterance span only matches within 0.1 s
    assert clue_times("at 0.60-0.90 s the lips press", [(0.53, 1.10)]) == [(0.6, 0.9)]


def test_clue_times_read_the_usual_spellings():
    text = ("between 1.2 and 1.5 seconds, at 2.1 s and 3.5 s, 4s-4.4s, 5.1 s to 5.6 s, 6.00–6.25 s; "
            "utterances 3-5 and 2 speakers are not times; again at 2.1 s.")
    assert clue_times(text) == [(1.2, 1.5), (2.1, 2.1), (3.5, 3.5), (4.0, 4.4), (5.1, 5.6), (6.0, 6.25)]


def test_clue_hit_tolerance_edges():
    ref = [(1.20, 1.45)]
    # hit when the predicted time overlaps [1.20 - 0.5, 1.45 + 0.5] = [0.70, 1.95]
    assert clue_hits(ref, [(1.3, 1.3)]) == 1
    assert clue_hits(ref, [(1.95, 1.95)]) == 1 and clue_hits(ref, [(1.96, 1.96)]) == 0
    assert clue_hits(ref, [(0.70, 0.70)]) == 1 and clue_hits(ref, [(0.69, 0.69)]) == 0
    assert clue_hits(ref, [(1.96, 2.5)], tol_s=0.6) == 1
    assert clue_hits([(1.0, 1.2), (5.0, 5.3)], [(1.1, 1.1), (9.0, 9.5)]) == 1


def test_clue_timing_is_pooled_over_clips(matcher):
    refs = [
        {"video_id": "hit", "labels": ["annoyed"], "description": SYNTH_EXPLANATION, "utterances": TRANSCRIPT},
        {"video_id": "utt", "labels": ["annoyed"], "description": SYNTH_EXPLANATION, "utterances": TRANSCRIPT},
        {"video_id": "none", "labels": ["calm"], "description": "The face stays composed.", "utterances": TRANSCRIPT},
        {"video_id": "given", "labels": ["sad"], "description": "at 9.0 s", "clue_times": [[3.0, 3.2], [6.0, 6.1]]},
    ]
    preds = [
        {"video_id": "hit", "text": "At 1.30 s the brows draw together.\nEmotions: annoyed"},
        # names only the utterance span, which contains the clue: not evidence, so a miss
        {"video_id": "utt", "text": "At 0.53-2.70 s the speaker frowns.\nEmotions: annoyed"},
        {"video_id": "none", "text": "At 1.0 s nothing happens.\nEmotions: calm"},
        {"video_id": "given", "text": "At 3.5 s the mouth drops.\nEmotions: sad"},
    ]
    report = score_clips(preds, refs, matcher)
    # hit: 1 of 1; utt: 0 of 1; none: no reference times (not counted); given: 3.5 is within 0.5 s of
    # 3.0-3.2 but not of 6.0-6.1 -> 1 of 2.  Pooled: 2 / 4 = 0.5
    assert report["clue_timing"] == {"hits": 2, "total": 4, "rate": 0.5, "n_clips": 3}
    assert [(c["clue_hits"], c["clue_total"]) for c in report["clips"]] == [(1, 1), (0, 1), (0, 0), (1, 2)]
    assert report["well_formed"] == {"n": 4, "rate": 1.0}


# ------------------------------------------------------------------------------------ per utterance

def test_utterance_labels_match_by_time_then_index(matcher):
    ref = {"video_id": "v", "labels": ["angry"],
           "utterances": [{"start_s": 0.5, "end_s": 2.0}, {"start_s": 2.5, "end_s": 4.0},
                          {"start_s": 4.5, "end_s": 6.0}, {"start_s": 6.5, "end_s": 8.0}],
           "utterance_labels": [{"start_s": 4.5, "end_s": 6.0, "labels": ["sad"]},
                                {"start_s": 0.5, "end_s": 2.0, "labels": ["neutral"]},
                                {"start_s": 2.5, "end_s": 4.0, "labels": ["angry"]},
                                {"start_s": 6.5, "end_s": 8.0, "labels": ["happy"]},
                                {"start_s": 7.0, "end_s": 7.5, "labels": []}]}
    text = ("The voice rises.\nEmotions: angry\n"
            "Utterance 1 (0.50-2.00 s): calm\n"      # by time: neutral group = neutral group -> 1, 1
            "Utterance 2: furious, happy\n"          # by index 2: P = {anger/rage, joy/...}, G = {anger/rage} -> 1/2, 1
            "Utterance 9 (4.60-5.90 s): sorrowful")  # wrong index, but overlaps 4.5-6.0: sadness = sadness -> 1, 1
    # utterance 4 (6.5-8.0, happy) has no prediction -> 0, 0; the empty reference (7.0-7.5) is not scored
    # accuracy = (1 + 0.5 + 1 + 0) / 4 = 0.625, recall = (1 + 1 + 1 + 0) / 4 = 0.75
    report = score_clips([{"video_id": "v", "text": text}], [ref], matcher)
    assert report["utterance"]["n"] == 4
    assert report["utterance"]["group"] == {"accuracy": 0.625, "recall": 0.75, "score": 0.6875}
    assert report["utterance"]["score"] == 0.6875 and report["utterance"]["coarse"]["accuracy"] == 0.625
    assert report["clips"][0]["utterances"] == 4


def test_utterance_labels_from_label_predictions_use_index_without_transcript(matcher):
    ref = {"video_id": "v", "labels": ["sad"],
           "utterance_labels": [{"start_s": 3.0, "end_s": 4.0, "labels": ["sad"]},
                                {"start_s": 1.0, "end_s": 2.0, "labels": ["happy"]}]}
    pred = {"video_id": "v", "labels": ["sad"],
            "utterances": [{"index": 1, "labels": ["glad"]}, {"index": 2, "labels": ["angry"]}]}
    # no transcript: rank by start time -> 1.0-2.0 is utterance 1 (happy ~ glad: 1, 1),
    # 3.0-4.0 is utterance 2 (sad vs angry: 0, 0) -> mean 0.5, 0.5
    report = score_clips([pred], [ref], matcher)
    assert report["utterance"]["group"] == {"accuracy": 0.5, "recall": 0.5, "score": 0.5}


# ------------------------------------------------------------------------------------ breakdown

def test_breakdown_by_mode(matcher):
    refs = [{"video_id": "a", "labels": ["annoyed"], "mode": "face_only"},
            {"video_id": "b", "labels": ["sad"], "mode": "face_only"},
            {"video_id": "c", "labels": ["happy"], "mode": "all"}]
    preds = [{"video_id": "a", "labels": ["irritated"]}, {"video_id": "b", "labels": ["happy"]},
             {"video_id": "c", "labels": ["cheerful"]}]
    report = score_clips(preds, refs, matcher, by="mode")
    # a: 1, 1; b: 0, 0; c: 1, 1 -> overall 2/3; face_only (a, b) 0.5; all (c) 1.0
    assert report["accuracy"] == pytest.approx(2 / 3)
    modes = report["by"]["mode"]
    assert set(modes) == {"face_only", "all"}
    assert modes["face_only"]["n_clips"] == 2 and modes["face_only"]["score"] == 0.5
    assert modes["all"]["n_clips"] == 1 and modes["all"]["score"] == 1.0
    assert [c["mode"] for c in report["clips"]] == ["face_only", "face_only", "all"]
    json.dumps(report)


# ------------------------------------------------------------------------------------ similarity

@pytest.mark.slow
def test_words_outside_the_lexicon_join_the_most_similar_group():
    lex = Lexicon.load()
    matcher = LabelMatcher(lex, embedder="default", threshold=0.6)
    assert lex.head("upbeat") is None and lex.head("tearful") is None  # not in the lexicon itself
    matcher.prepare(["upbeat", "tearful", "xyzzy", "fearless"])
    assert matcher.group("upbeat") == "joy/cheerfulness"   # nearest: cheerful (cosine about 0.73)
    assert matcher.group("tearful") == "sadness/sadness"   # nearest: sorrowful (about 0.69)
    assert matcher.group("xyzzy") == "xyzzy"               # nearest is below 0.6: alone
    assert matcher.group("fearless") == "fearless"         # antonym of a lexicon word: never matched
    assert matcher.nearest(["upbeat"])["upbeat"][0] == "cheerful"
    # the threshold is applied: at 0.8 "upbeat" stays alone
    strict = LabelMatcher(lex, embedder=matcher.embedder, threshold=0.8)
    assert strict.group("upbeat") == "upbeat"
    # the whole chain: upbeat vs happy scores 1 with the model, 0 without
    assert score(matcher, ["upbeat"], ["happy"])["score"] == 1.0
    assert score(LabelMatcher(lex, embedder=None), ["upbeat"], ["happy"])["score"] == 0.0
