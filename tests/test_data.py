"""Feature-store samples as training reads them."""

import numpy as np
import pytest

from jobs.data import iter_samples

pytestmark = pytest.mark.integration


def test_samples_carry_every_modality_with_consistent_shapes(synth_store, corpus):
    import json

    truth = {t["video_id"]: t for t in map(json.loads, (corpus[0] / "truth.jsonl").read_text().splitlines())}
    samples = list(iter_samples(str(synth_store)))
    assert sorted(s["video_id"] for s in samples) == sorted(truth)
    for s in samples:
        t = truth[s["video_id"]]
        n = len(s["frame_pts"])
        assert n > 5 and np.all(np.diff(s["frame_pts"]) > 0)
        assert s["global_feat"].shape == (n, 5, 1280) and s["face_feat"].shape == (n, 128)
        assert s["dynamics"].shape == (n, 88) and s["face_found"].dtype == bool
        assert not s["face_feat"][~s["face_found"]].any()
        assert s["audio_feat"].shape[1] == 384 and s["audio_span"].shape == (len(s["audio_feat"]), 2)
        assert s["labels"] == t["labels"] and s["split"] == t["split"]
        assert len(s["utterances"]) >= 1
    train = list(iter_samples(str(synth_store), split="train"))
    assert train and all(s["split"] == "train" for s in train)
    one = next(iter(truth))
    assert [s["video_id"] for s in iter_samples(str(synth_store), video_ids={one})] == [one]
