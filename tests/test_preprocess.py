"""The preprocessing pipeline end to end on real engines: Ray (local, and two nodes on this
host), ffmpeg, dlib, the embedded encoders, Parquet on local disk and on S3 (a moto server on
127.0.0.1), a SIGKILLed run resumed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from pipeline.dynamics import DIM as DYN_DIM
from pipeline.run import PreprocessConfig, preprocess
from pipeline.store import FeatureStore

pytestmark = pytest.mark.integration

BAD_EXPECT = {
    "zero_byte": ("error", "empty_file"), "text_as_mp4": ("error", "corrupt"),
    "truncated": ("error", "truncated"), "playlist_as_mp4": ("error", "corrupt"),
    "audio_only": ("error", "no_video_stream"), "missing": ("error", "missing_file"),
    "no_audio": ("no_audio", "no_audio"), "no_face": ("no_face", "no_face"),
}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed_manifest(corpus, bad_inputs, tmp_path_factory):
    """The synth corpus plus every kind of bad input and bad manifest row."""
    out, _, _ = corpus
    d = tmp_path_factory.mktemp("mixed")
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    for r in rows:  # absolute paths so the manifest can live elsewhere
        r["uri"] = str(out / r["uri"])
        if "srt" in r:
            r["srt"] = str(out / r["srt"])
    for name, path in bad_inputs.items():
        rows.append({"video_id": f"bad_{name}", "uri": str(path)})
    rows.append({"video_id": "../../etc/x", "uri": str(bad_inputs["no_face"])})
    rows.append({"video_id": rows[0]["video_id"], "uri": str(bad_inputs["no_face"])})  # duplicate id
    manifest = d / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, rows


def table(store_dir, name):
    return pq.read_table(str(Path(store_dir) / name)).to_pandas()


@pytest.fixture(scope="module")
def local_run(mixed_manifest, ray_local, tmp_path_factory):
    manifest, rows = mixed_manifest
    root = tmp_path_factory.mktemp("run")
    out = root / "fs"
    before = sorted(p for p in Path(manifest).parent.rglob("*"))
    cfg = PreprocessConfig(manifest=str(manifest), out=str(out), videos_per_shard=4, max_error_rate=1.0)
    summary = preprocess(cfg, progress=False)
    assert sorted(p for p in Path(manifest).parent.rglob("*")) == before
    assert sorted(p.name for p in root.iterdir()) == ["fs"]  # nothing beside the store
    return out, summary, rows


def test_every_input_has_a_row_and_bad_ones_say_why(local_run, corpus):
    out, summary, rows = local_run
    videos = table(out, "videos").set_index("video_id")
    assert len(videos) == len(rows) and summary["processed"] == len(rows)
    for name, (status, error_type) in BAD_EXPECT.items():
        v = videos.loc[f"bad_{name}"]
        assert (v.status, v.error_type) == (status, error_type), name
        assert v.error
    n = len(rows)  # the last two manifest lines: ../../etc/x, then a repeated id
    assert videos.loc[f"_line{n - 1}"].error_type == "bad_id"
    assert videos.loc[f"_line{n}"].error_type == "duplicate_id"
    assert summary["errors"]["corrupt"] == 2 and summary["failed"] == 8
    assert not Path("/etc/x").exists()


def test_good_videos_are_complete(local_run, corpus):
    out, _, _ = local_run
    corpus_dir, cfg, _ = corpus
    truth = {t["video_id"]: t for t in map(json.loads, (corpus_dir / "truth.jsonl").read_text().splitlines())}
    videos = table(out, "videos").set_index("video_id")
    frames, utts, audio, labels = (table(out, n) for n in ("frames", "utterances", "audio", "labels"))
    for vid, t in truth.items():
        v = videos.loc[vid]
        assert v.status == "ok" and v.n_faces >= 0.8 * v.n_frames
        f = frames[frames.video_id == vid].sort_values("frame_index")
        assert len(f) == v.n_frames == int(np.ceil((t["n_frames"] - 0.5) / 12.5))
        assert np.allclose(np.diff(f.pts_s), 0.5, atol=0.041)
        assert all(len(x) == 5 * 1280 for x in f.global_feat)
        found = f[f.face_found]
        assert all(len(x) == 128 for x in found.face_feat) and all(len(x) == DYN_DIM for x in found.dynamics)
        u = utts[utts.video_id == vid].sort_values("utt_index")
        if t["utterance_source"] != "none":
            assert np.allclose(u.start_s, [x["start_s"] for x in t["utterances"]])
            assert set(u.source) == {"manifest" if t["utterance_source"] == "inline" else "srt"}
        else:
            assert set(u.source) <= {"asr"} and len(u) >= 1
        a = audio[audio.video_id == vid]
        assert len(a) == int(np.ceil(v.duration_s - 1e-6)) or abs(len(a) - v.duration_s) <= 1
        lab = labels[labels.video_id == vid].iloc[0]
        assert list(lab.labels) == t["labels"]


def test_store_reads_with_pyarrow_pandas_and_duckdb(local_run):
    import duckdb
    import pandas as pd

    out, _, _ = local_run
    n = pq.read_table(str(out / "frames")).num_rows
    assert len(pd.read_parquet(out / "frames")) == n
    got = duckdb.sql(f"select count(*), count(distinct video_id) from '{out}/frames/*.parquet'").fetchall()[0]
    assert got[0] == n
    feat = duckdb.sql(f"select global_feat from '{out}/frames/*.parquet' limit 1").fetchall()[0][0]
    assert len(feat) == 6400
    # no null fixed-size lists anywhere (pyarrow < 26 cannot read them back: apache/arrow#35692), yet
    # the store has frames without a face (the no-face input), whose face columns are zeros
    frames = pq.read_table(str(out / "frames"))
    assert not all(frames.column("face_found").to_pylist())
    for name in ("frames", "audio"):
        t = pq.read_table(str(out / name))
        for field in t.schema:
            if pa.types.is_fixed_size_list(field.type):
                assert t.column(field.name).null_count == 0, (name, field.name)
    off = frames.filter(pc.invert(frames.column("face_found")))
    assert np.all(np.stack(off.column("dynamics").to_numpy(zero_copy_only=False)) == 0)
    schema = pq.read_schema(next((out / "frames").glob("*.parquet")))
    assert schema.field("global_feat").metadata[b"encoder"].startswith(b"mobilenet_v2")
    lineage = json.loads((out / "_lineage.json").read_text())
    assert lineage["encoders"]["face"]["id"] == "dlib-resnet-128" and lineage["encoders"]["frame"]["weight_hash"]
    # row groups are clustered by video
    pf = pq.ParquetFile(next((out / "frames").glob("*.parquet")))
    for i in range(pf.num_row_groups):
        assert len(set(pf.read_row_group(i, columns=["video_id"]).column(0).to_pylist())) == 1


def test_zero_fill_replaces_null_fixed_size_lists_and_keeps_the_rest():
    from pipeline.store import zero_fill

    f16 = pa.list_(pa.float16(), 3)
    part = pa.table({"x": pa.array([[1, 2, 3], None, [4, 5, 6]], f16), "n": pa.array([1, None, 3], pa.int32()),
                     "tags": pa.array([["a"], None, []], pa.list_(pa.string()))})
    table = pa.concat_tables([part, part.slice(1)])  # two chunks, the second one sliced (non-zero offset)
    filled = zero_fill(table)
    assert filled.schema == table.schema
    assert filled.column("x").null_count == 0
    assert filled.column("x").to_pylist() == [[1, 2, 3], [0, 0, 0], [4, 5, 6], [0, 0, 0], [4, 5, 6]]
    assert filled.column("n").to_pylist() == [1, None, 3, None, 3]  # only fixed-size lists are filled
    assert filled.column("tags").to_pylist() == [["a"], None, [], None, []]


def test_rerun_skips_and_changed_videos_are_redone_without_duplicates(local_run, mixed_manifest, tmp_path):
    out, _, rows = local_run
    manifest, _ = mixed_manifest
    copy = tmp_path / "fs"
    shutil.copytree(out, copy)
    cfg = PreprocessConfig(manifest=str(manifest), out=str(copy), videos_per_shard=4, max_error_rate=1.0)
    again = preprocess(cfg, progress=False)
    assert again["processed"] == 0 and again["skipped"] == len(rows)
    # a changed input (new mtime) is processed again; its old rows go away
    target = Path(rows[0]["uri"])
    os.utime(target, ns=(time.time_ns(), time.time_ns()))
    third = preprocess(cfg, progress=False)
    assert third["processed"] == 1
    videos = table(copy, "videos")
    assert videos.video_id.is_unique and len(videos) == len(rows)
    frames = table(copy, "frames")
    assert not frames.duplicated(["video_id", "frame_index"]).any()
    assert (frames.video_id == rows[0]["video_id"]).sum() == (table(out, "frames").video_id == rows[0]["video_id"]).sum()


def test_dynamics_peak_at_planted_micro_events(local_run, corpus):
    """For each planted event: among sampled frames within 1 s of it (and away from other events in
    the same region), the one whose window shows the most motion in that region overlaps the event."""
    from pipeline.dynamics import ENERGY_REGIONS, STEPS

    out, _, _ = local_run
    corpus_dir, _, _ = corpus
    frames = table(out, "frames")
    hits, total = {}, {}
    for t in map(json.loads, (corpus_dir / "truth.jsonl").read_text().splitlines()):
        f = frames[(frames.video_id == t["video_id"]) & frames.face_found]
        evs = t["micro_events"]
        for ev in evs:
            ri = ENERGY_REGIONS.index(ev["region"])
            peaks = [(p, float(np.asarray(d, np.float32)[8 * STEPS + ri])) for p, d in zip(f.pts_s, f.dynamics)]

            def overlaps(p, e):
                return p - 0.2 <= e["offset_s"] and p + 0.2 >= e["onset_s"]

            cands = [(p, v) for p, v in peaks if abs(p - ev["peak_s"]) <= 1.0 and not any(
                overlaps(p, o) for o in evs if o is not ev and o["region"] == ev["region"])]
            if not any(overlaps(p, ev) for p, _ in cands):
                continue
            best = max(cands, key=lambda x: x[1])[0]
            total[ev["region"]] = total.get(ev["region"], 0) + 1
            hits[ev["region"]] = hits.get(ev["region"], 0) + overlaps(best, ev)
    rate = sum(hits.values()) / sum(total.values())
    print(f"dynamics hit rate by region: { {k: f'{hits.get(k, 0)}/{v}' for k, v in total.items()} } overall {rate:.2f}")
    assert sum(total.values()) >= 5 and rate >= 0.6


# which geometry measure each planted action unit moves, and which way (pipeline.synth.emotions.ACTIONS)
EXPECTED_SIGN = {"brows_furrow": ("brow_inner", -1), "brows_inner_raise": ("brow_inner", 1),
                 "brows_raise": ("brow_outer", 1), "mouth_corners_up": ("mouth_corner_lift", 1),
                 "mouth_corners_down": ("mouth_corner_lift", -1), "eyes_widen": ("eye_open", 1),
                 "eyes_squint": ("eye_open", -1), "lips_press": ("mouth_width", -1), "upper_lip_raise": ("upper_lip", -1)}


def _face_layout() -> np.ndarray:
    """A crude 68-point iBUG face, 100 px wide, y down (enough for the geometry measures)."""
    lm = np.zeros((68, 2))
    lm[0:17] = np.stack([np.linspace(5, 95, 17), 50 + 40 * np.sin(np.linspace(0, np.pi, 17))], 1)  # jaw
    lm[17:22] = np.stack([np.linspace(20, 42, 5), [32, 30, 29, 30, 31]], 1)  # left brow, outer -> inner
    lm[22:27] = np.stack([np.linspace(58, 80, 5), [31, 30, 29, 30, 32]], 1)
    lm[27:31] = np.stack([[50] * 4, np.linspace(40, 55, 4)], 1)  # nose bridge
    lm[31:36] = np.stack([np.linspace(44, 56, 5), [58] * 5], 1)  # nostrils; 33 in the middle
    for base, cx in ((36, 30), (42, 70)):  # eyes: corner, 2 upper, corner, 2 lower
        lm[base:base + 6] = [(cx - 8, 40), (cx - 3, 37), (cx + 3, 37), (cx + 8, 40), (cx + 3, 43), (cx - 3, 43)]
    outer_x = np.array([38, 42, 46, 50, 54, 58, 62, 58, 54, 50, 46, 42])
    outer_y = np.array([72, 69, 68, 68, 68, 69, 72, 76, 78, 78, 78, 76])
    lm[48:60] = np.stack([outer_x, outer_y], 1)
    lm[60:68] = np.stack([[41, 46, 50, 54, 59, 54, 50, 46], [72, 71, 71, 71, 72, 74, 74, 74]], 1)
    return lm


def test_geometry_measures_move_the_way_each_planted_action_does():
    """Each action unit the synthetic corpus plants (its landmark displacements, face width 100 px,
    amplitude 5 px) moves its measure in the documented direction, and a still face measures zero
    change."""
    from pipeline.dynamics import GEOMETRY, geometry
    from pipeline.synth.emotions import ACTIONS

    base = _face_layout()
    g0 = geometry(base[None])[0]
    for kind, (measure, sign) in EXPECTED_SIGN.items():
        moved = base.copy()
        for i, (dx, dy) in ACTIONS[kind]["points"].items():
            moved[i] += 5 * np.array([dx, dy])
        change = geometry(moved[None])[0] - g0
        assert change[GEOMETRY.index(measure)] * sign > 0.02, (kind, dict(zip(GEOMETRY, change.round(3))))
    # scale and translation do not change the measures (distances are in inter-ocular units)
    assert np.allclose(geometry((base * 2.5 + 7)[None])[0], g0, atol=1e-5)


def test_dynamics_geometry_tells_which_way_the_face_moved(local_run, corpus):
    """At the sampled frame nearest each planted action (within 0.15 s of its peak), the largest signed
    change of the measure that action moves has the action's sign: brows down for a furrow, up for a
    raise, mouth corners up for a smile. The unsigned energy cannot tell these apart. (On the 60-clip
    demo corpus: 44 of 53 = 0.83.)"""
    from pipeline.dynamics import GEOMETRY, GEOMETRY_OFFSET, STEPS

    out, _, _ = local_run
    corpus_dir, _, _ = corpus
    frames = table(out, "frames")
    agree = total = 0
    for t in map(json.loads, (corpus_dir / "truth.jsonl").read_text().splitlines()):
        f = frames[(frames.video_id == t["video_id"]) & frames.face_found]
        if f.empty:
            continue
        pts = f.pts_s.to_numpy()
        extremes = np.stack([np.asarray(d, np.float32)[GEOMETRY_OFFSET + len(GEOMETRY) * STEPS:] for d in f.dynamics])
        for ev in t["micro_events"]:
            if ev["kind"] not in EXPECTED_SIGN:
                continue
            i = int(np.argmin(np.abs(pts - ev["peak_s"])))
            if abs(pts[i] - ev["peak_s"]) > 0.15:
                continue
            measure, sign = EXPECTED_SIGN[ev["kind"]]
            total += 1
            agree += bool(extremes[i, GEOMETRY.index(measure)] * sign > 0)
    print(f"geometry sign agrees with the planted action: {agree}/{total}")
    assert total >= 5 and agree / total >= 0.7


def test_two_node_cluster_processes_the_corpus(corpus, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    corpus_dir, _, _ = corpus
    was = ray.is_initialized()
    if was:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        cfg = PreprocessConfig(manifest=str(corpus_dir / "manifest.jsonl"), out=str(tmp_path / "fs"),
                               videos_per_shard=2, workers=2)
        summary = preprocess(cfg, progress=False)
        assert summary["processed"] == 6 and summary["failed"] == 0
        assert len(FeatureStore(str(tmp_path / "fs")).shards()) == 3
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _rows_by_video(store_url, opts=None):
    store = FeatureStore(store_url, opts)
    videos = store.read_table("videos").to_pandas().set_index("video_id")
    frames = store.read_table("frames").to_pandas()
    return videos, frames


def test_same_run_against_s3_gives_the_same_rows(corpus, local_run, s3, ray_local):
    client, opts = s3
    corpus_dir, _, _ = corpus
    client.create_bucket(Bucket="corpus")
    client.create_bucket(Bucket="features")
    for path in corpus_dir.rglob("*"):
        if path.is_file() and path.suffix in (".mp4", ".srt", ".jsonl"):
            client.upload_file(str(path), "corpus", str(path.relative_to(corpus_dir)))
    manifest = (corpus_dir / "manifest.jsonl").read_text() + json.dumps({"video_id": "gone", "uri": "videos/gone.mp4"}) + "\n"
    client.put_object(Bucket="corpus", Key="with_missing.jsonl", Body=manifest.encode())
    cfg = PreprocessConfig(manifest="s3://corpus/with_missing.jsonl", out="s3://features/v1", storage_options=opts,
                           videos_per_shard=4, max_error_rate=1.0)
    summary = preprocess(cfg, progress=False)
    assert summary["processed"] == 7 and summary["errors"] == {"missing_file": 1}
    remote_v, remote_f = _rows_by_video("s3://features/v1", opts)
    local_v, local_f = _rows_by_video(str(local_run[0]))
    ids = sorted(i for i in remote_v.index if i != "gone")
    assert len(ids) == 6
    for vid in ids:
        assert remote_v.loc[vid].status == local_v.loc[vid].status == "ok"
        assert remote_v.loc[vid].content_hash == local_v.loc[vid].content_hash
        a = remote_f[remote_f.video_id == vid].sort_values("frame_index")
        b = local_f[local_f.video_id == vid].sort_values("frame_index")
        assert len(a) == len(b) and np.array_equal(np.stack(a.global_feat), np.stack(b.global_feat))
    listing = client.list_objects_v2(Bucket="features")["Contents"]
    assert not [o["Key"] for o in listing if "_staging" in o["Key"]]
    assert "_lineage.json" in {o["Key"].split("/")[-1] for o in listing}
    # a rerun against S3 skips everything
    assert preprocess(cfg, progress=False)["skipped"] == 7


def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_rows(corpus, local_run, tmp_path, ray_local):
    corpus_dir, _, _ = corpus
    out = tmp_path / "fs"
    cmd = [sys.executable, "-m", "jobs.cli", "preprocess", "--manifest", str(corpus_dir / "manifest.jsonl"),
           "--out", str(out), "--workers", "1", "-q", "videos_per_shard=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list((out / "videos").glob("*.parquet"))) < 2:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.2)
        assert len(list((out / "videos").glob("*.parquet"))) >= 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray and the workers
        proc.wait()
    partial = len(FeatureStore(str(out)).committed())
    assert 2 <= partial < 6
    summary = preprocess(PreprocessConfig(manifest=str(corpus_dir / "manifest.jsonl"), out=str(out),
                                          videos_per_shard=2), progress=False)
    assert summary["skipped"] == partial and summary["processed"] == 6 - partial
    got_v, got_f = _rows_by_video(str(out))
    ref_v, ref_f = _rows_by_video(str(local_run[0]))
    assert got_v.index.is_unique and sorted(got_v.index) == sorted(t for t in ref_v.index if t.startswith("syn"))
    assert not got_f.duplicated(["video_id", "frame_index"]).any()
    for vid in got_v.index:
        assert (got_f.video_id == vid).sum() == (ref_f.video_id == vid).sum()
    assert not (out / "_staging").exists() or not any((out / "_staging").iterdir())


def test_a_killed_worker_is_restarted_and_its_batch_retried(corpus, tmp_path, ray_local):
    """SIGKILL the actor process mid-run: Ray restarts it, the batch is retried, nothing is lost
    or duplicated (the shard it was writing is never half-visible)."""
    import threading

    import psutil

    corpus_dir, _, _ = corpus
    out = tmp_path / "fs"
    cfg = PreprocessConfig(manifest=str(corpus_dir / "manifest.jsonl"), out=str(out), workers=1, videos_per_shard=2)
    result = {}
    runner = threading.Thread(target=lambda: result.update(preprocess(cfg, progress=False)))
    runner.start()
    killed = None
    deadline = time.time() + 240
    while killed is None and time.time() < deadline and runner.is_alive():
        if list((out / "videos").glob("*.parquet")):  # first shard committed: the actor is busy with the next
            for p in psutil.process_iter(["cmdline"]):
                if any("ShardWorker" in part for part in (p.info["cmdline"] or [])):
                    p.kill()
                    killed = p.pid
                    break
        time.sleep(0.1)
    runner.join(300)
    assert killed is not None, "no worker process found to kill"
    assert result["processed"] == 6 and result["failed"] == 0
    videos, frames = _rows_by_video(str(out))
    assert sorted(videos.index) == [f"syn{i:06d}" for i in range(6)]
    assert not frames.duplicated(["video_id", "frame_index"]).any()


def test_worker_thread_cap_reaches_every_library():
    """ProcessConfig.threads: a 1-CPU Ray worker caps torch, OpenCV, CTranslate2 and ffmpeg at one
    thread (so workers sharing a machine do not oversubscribe it); -1 keeps the libraries' defaults.
    Checked in a fresh process: the caps are process-wide."""
    from pipeline.decode import DecodeConfig, _threads
    from pipeline.process import ProcessConfig
    from pipeline.run import worker_threads

    assert worker_threads(ProcessConfig(), 1.0) == 1 and worker_threads(ProcessConfig(), 2.5) == 3
    assert worker_threads(ProcessConfig(threads=-1), 4) == 0 and worker_threads(ProcessConfig(threads=3), 1) == 3
    assert _threads(DecodeConfig()) == [] and _threads(DecodeConfig(threads=2))[-2:] == ["-threads", "2"]
    code = ("import cv2, torch; from pipeline.process import ProcessConfig, VideoProcessor; "
            "p = VideoProcessor(ProcessConfig(), threads=1); "
            "print(cv2.getNumThreads(), torch.get_num_threads(), p.cfg.decode.threads, "
            "p.audio_encoder.cpu_threads)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-4:] == ["1", "1", "1", "1"]


def test_ray_address_is_the_flag_then_ray_address_then_a_new_local_ray(monkeypatch):
    from pipeline.run import ray_address

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_address(None) == "local"  # never a cluster a stray `ray start` left on the host
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what a Ray job's entrypoint sees
    assert ray_address(None) == "10.0.0.5:6379" and ray_address("auto") == "auto"
