"""Batch prediction, evaluation reports and `microemo infer` with a real (tiny) trained model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from jobs.evaluate import EvalConfig, evaluate, read_references
from jobs.predict import (PredictConfig, PredictionTable, model_id, predict_store, prediction_url,
                          resolve_model_dir)

BIN = Path(sys.executable).parent


def _rows(url: str) -> list[str]:
    ids = []
    for part in PredictionTable(url).parts():
        ids += pq.read_table(part, columns=["video_id"]).column("video_id").to_pylist()
    return ids


def test_model_dir_resolution(tiny_model, tmp_path):
    assert resolve_model_dir(tiny_model) == tiny_model / "export"
    assert resolve_model_dir(tiny_model / "export") == tiny_model / "export"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_model_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="model_config.json"):
        resolve_model_dir(tmp_path)


def test_local_batch_prediction_is_resumable(tiny_model, synth_store, tmp_path):
    cfg = PredictConfig(model=str(tiny_model), features=str(synth_store), split=None, launcher="local",
                        out=str(tmp_path / "preds"), videos_per_part=4, max_new_tokens=12)
    first = predict_store(cfg, progress=False)
    refs = read_references(str(synth_store), None)
    assert first["predicted"] == len(refs) == 6 and first["skipped"] == 0
    again = predict_store(cfg, progress=False)
    assert again["predicted"] == 0 and again["skipped"] == 6
    ids = _rows(cfg.out)
    assert sorted(ids) == sorted(refs)  # exactly one prediction per clip
    rows = PredictionTable(cfg.out).read()
    assert {r["model_id"] for r in rows} == {model_id(tiny_model)}
    assert all(isinstance(r["labels"], list) and isinstance(r["text"], str) for r in rows)


def test_batch_prediction_killed_and_rerun_gives_one_prediction_per_clip(tiny_model, synth_store, tmp_path):
    """A real `microemo predict` on local Ray, SIGKILLed (with its Ray processes) after its first
    committed part, then rerun to the end."""
    url = str(tmp_path / "preds")
    cmd = [str(BIN / "microemo"), "predict", "--model", str(tiny_model), "--features", str(synth_store),
           "--all-splits", "--out", url, "--workers", "1", "-q", "videos_per_part=1", "max_new_tokens=12"]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and not PredictionTable(url).parts() and proc.poll() is None:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    # the actor process lives in its own session: it notices its raylet is gone and exits,
    # possibly after committing the batch it was working on; wait for it before counting
    deadline = time.time() + 60
    while time.time() < deadline and any("PredictWorker" in " ".join(p.info["cmdline"] or [])
                                         for p in psutil.process_iter(["cmdline"])):
        time.sleep(0.5)
    before = _rows(url)
    assert 1 <= len(before) < 6, proc.stdout.read().decode()[-2000:]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert f"{6 - len(before)} new, {len(before)} already there" in res.stdout
    after = _rows(url)
    assert sorted(after) == sorted(read_references(str(synth_store), None))  # no duplicates, no gaps
    assert len(after) == len(set(after)) == 6


def test_reference_perfect_predictions_score_one(tiny_model, synth_store, tmp_path):
    """evaluate reuses committed predictions: writing the references as predictions must score 1."""
    refs = read_references(str(synth_store), None)
    tag = model_id(tiny_model)
    url = prediction_url(PredictConfig(features=str(synth_store)), tag)
    table = PredictionTable(url)
    assert not table.parts()
    try:
        table.write([{"video_id": vid, "model_id": tag, "text": None, "explanation": r["description"],
                      "labels": [label.upper() + " " for label in r["labels"]],  # case/whitespace do not matter
                      "utterances": [], "well_formed": True, "seconds": 0.0, "predicted_at": None}
                     for vid, r in refs.items()])
        m = evaluate(EvalConfig(model=str(tiny_model), features=str(synth_store), split=None, out="",
                                embedder=False), progress=False)
    finally:
        table.fs.rm(table.root, recursive=True)
    assert m["n_clips"] == 6
    for level in ("group", "fine", "coarse", "exact"):
        assert m[level]["accuracy"] == pytest.approx(1.0) and m[level]["recall"] == pytest.approx(1.0)
    assert m["clue_timing"]["total"] > 0 and m["clue_timing"]["rate"] == pytest.approx(1.0)


def test_evaluate_cli_writes_a_report(tiny_model, synth_store, corpus, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(tiny_model), "--features", str(synth_store), "--out", str(out),
               "--groups", str(corpus[0] / "truth.jsonl"), "--by", "mode", "-q", "split=null", "embedder=false",
               "predict.max_new_tokens=12", f"predict.out={tmp_path / 'preds'}", "timelines=2"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| all clips | 6 |" in printed and "mode=" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_clips"] == 6 and 0.0 <= metrics["score"] <= 1.0
    truth = [json.loads(line) for line in (corpus[0] / "truth.jsonl").read_text().splitlines()]
    assert set(metrics["by"]["mode"]) == {t["mode"] for t in truth}
    assert sum(v["n_clips"] for v in metrics["by"]["mode"].values()) == 6
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["video_id"] for p in preds) == sorted(t["video_id"] for t in truth)
    report = (out / "report.md").read_text()
    assert "# Evaluation" in report and report.count("](timelines/") == 2
    pngs = sorted((out / "timelines").glob("*.png"))
    assert len(pngs) == 2 and all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert (out / "config.yaml").is_file()


def test_evaluate_rejects_a_missing_model(synth_store, tmp_path, capsys):
    rc = main(["evaluate", "--model", str(tmp_path / "none"), "--features", str(synth_store),
               "--out", str(tmp_path / "r"), "-q"])
    assert rc == 2 and "no such directory" in capsys.readouterr().err


def test_infer_explains_one_clip(tiny_model, corpus, tmp_path, capsys):
    corpus_dir, _, _ = corpus
    truth = json.loads((corpus_dir / "truth.jsonl").read_text().splitlines()[0])
    video = corpus_dir / "videos" / f"{truth['video_id']}.mp4"
    png = tmp_path / "timeline.png"
    rc = main(["infer", str(video), "--model", str(tiny_model), "--plot", str(png), "max_new_tokens=16"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    out = json.loads(captured.out)
    assert out["video_id"] == truth["video_id"] and out["model_id"] == model_id(tiny_model)
    assert abs(out["duration_s"] - truth["duration_s"]) < 0.1
    assert isinstance(out["labels"], list) and isinstance(out["explanation"], str)
    assert out["utterances"], "the clip has speech: utterances come from ASR/VAD"
    for u in out["utterances"]:
        assert 0.0 <= u["start_s"] <= u["end_s"] <= out["duration_s"]
    for t in out["micro_events_s"]:
        assert 0.0 <= t <= out["duration_s"]
    assert set(out["timings"]) == {"pipeline_s", "load_s", "generate_s"}
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("kind", ["text_as_mp4", "truncated", "missing"])
def test_infer_on_a_bad_file_exits_2_with_one_line(tiny_model, bad_inputs, kind, capsys):
    rc = main(["infer", str(bad_inputs[kind]), "--model", str(tiny_model)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("microemo infer: error:") and str(bad_inputs[kind].name) in err[-1]


def test_score_model_takes_nested_options_and_can_keep_predictions_out_of_the_store(tiny_model, synth_store,
                                                                                     tmp_path):
    from jobs.evaluate import score_model

    before = sorted(p.name for p in synth_store.iterdir())
    m = score_model(str(tiny_model), str(synth_store), video_ids=["syn000000", "syn000001"], embedder=False,
                    predict={"out": str(tmp_path / "preds"), "max_new_tokens": 8})
    assert m["n_clips"] == 2 and 0.0 <= m["score"] <= 1.0
    assert sorted(_rows(str(tmp_path / "preds"))) == ["syn000000", "syn000001"]
    assert sorted(p.name for p in synth_store.iterdir()) == before  # nothing new in the store
