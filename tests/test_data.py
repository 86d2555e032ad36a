"""Feature-store samples as training reads them."""

import numpy as np
import pytest

from jobs.data import iter_samples
from pipeline.dynamics import DIM as DYN_DIM

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
        assert s["dynamics"].shape == (n, DYN_DIM) and s["face_found"].dtype == bool
        assert not s["face_feat"][~s["face_found"]].any()
        assert s["audio_feat"].shape[1] == 384 and s["audio_span"].shape == (len(s["audio_feat"]), 2)
        assert s["labels"] == t["labels"] and s["split"] == t["split"]
        assert len(s["utterances"]) >= 1
    train = list(iter_samples(str(synth_store), split="train"))
    assert train and all(s["split"] == "train" for s in train)
    one = next(iter(truth))
    assert [s["video_id"] for s in iter_samples(str(synth_store), video_ids={one})] == [one]


def test_columnar_reader_gives_the_same_samples_as_row_assembly(synth_store):
    """iter_samples builds samples from Arrow columns (fast path); jobs.data.assemble builds them from
    row dicts (infer's path). Both must give the same sample for every video, value for value."""
    from jobs.data import _field_shape, _group, assemble
    from pipeline.store import FeatureStore

    fs = FeatureStore(str(synth_store))
    seen = 0
    for shard in fs.shards("videos"):
        t = {n: fs.read_table(n, shards=[shard]) for n in ("videos", "frames", "utterances", "audio", "labels")}
        shapes = {"global": _field_shape(t["frames"].schema, "global_feat"),
                  "face": _field_shape(t["frames"].schema, "face_feat")[1],
                  "dynamics": _field_shape(t["frames"].schema, "dynamics")[1],
                  "audio": _field_shape(t["audio"].schema, "audio_feat")[1]}
        rows = {n: _group(t[n]) for n in ("frames", "utterances", "audio")}
        labels = {r["video_id"]: r for r in t["labels"].to_pylist()}
        fast = {s["video_id"]: s for s in iter_samples(fs, shards=[shard])}
        for v in t["videos"].to_pylist():
            if v["video_id"] not in fast:
                continue
            vid = v["video_id"]
            slow = assemble(v, rows["frames"].get(vid, []), rows["audio"].get(vid, []),
                            rows["utterances"].get(vid, []), labels.get(vid), shapes)
            got = fast[vid]
            assert got.keys() == slow.keys()
            for k, want in slow.items():
                if isinstance(want, np.ndarray):
                    assert got[k].dtype == want.dtype and got[k].shape == want.shape, k
                    assert np.array_equal(got[k], want), (vid, k)
                else:
                    assert got[k] == want, (vid, k)
            seen += 1
    assert seen >= 4


def test_stream_shards_by_rank_shuffles_by_seed_and_resumes(synth_store):
    from jobs.data import SampleStream, check_store
    from pipeline.store import FeatureStore

    store = FeatureStore(str(synth_store))
    check_store(store)
    full = [s["video_id"] for s in SampleStream(store, None, seed=1)]
    assert sorted(full) == sorted(f"syn{i:06d}" for i in range(6))
    assert [s["video_id"] for s in SampleStream(store, None, seed=1)] == full  # deterministic
    other = [[s["video_id"] for s in SampleStream(store, None, seed=1, epoch=e)] for e in range(1, 6)]
    assert any(o != full for o in other)  # a new epoch reshuffles
    assert {s["epoch"] for s in SampleStream(store, None, seed=1, epoch=3)} == {3}  # for the collator's draws
    r0 = [s["video_id"] for s in SampleStream(store, None, rank=0, world_size=2, seed=1)]
    r1 = [s["video_id"] for s in SampleStream(store, None, rank=1, world_size=2, seed=1)]
    assert len(r0) == len(r1) == 3 and not set(r0) & set(r1)
    stream = SampleStream(store, None, seed=1)
    it = iter(stream)
    head = [next(it)["video_id"] for _ in range(2)]
    assert stream.position == 2
    rest = [s["video_id"] for s in SampleStream(store, None, seed=1, start=stream.position)]
    assert head + rest == full


def test_a_store_missing_a_column_fails_fast_naming_it(synth_store, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    from jobs.data import StoreSchemaError, check_store
    from pipeline.store import FeatureStore

    copy = tmp_path / "fs"
    shutil.copytree(synth_store, copy)
    for f in (copy / "frames").glob("*.parquet"):
        pq.write_table(pq.read_table(f).drop(["dynamics"]), f)
    with pytest.raises(StoreSchemaError, match=r"frames/ has no column 'dynamics'"):
        check_store(FeatureStore(str(copy)))
    second = tmp_path / "fs2"
    shutil.copytree(synth_store, second)
    shutil.rmtree(second / "audio")
    with pytest.raises(StoreSchemaError, match=r"table audio/ is missing"):
        check_store(FeatureStore(str(second)))
