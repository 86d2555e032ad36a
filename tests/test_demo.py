"""`microemo demo --quick` end to end: synth, preprocess, both training stages, a text-only
baseline, evaluation and the report — the same flow as `make demo`, with the tiny preset."""

import json

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main

pytestmark = pytest.mark.integration


def test_quick_demo_runs_the_whole_flow_and_writes_a_report(tmp_path, capsys, tools):
    assert main(["demo", "--out", str(tmp_path), "--quick", "--videos", "5"]) == 0
    out = capsys.readouterr().out
    assert "== synthetic corpus ==" in out and "5 clips" in out
    assert "== feature store ==" in out and "5 processed" in out
    videos = pq.read_table(str(tmp_path / "features" / "videos")).to_pylist()
    assert sorted(v["status"] for v in videos) == ["ok"] * 5
    for run in ("full_s1", "full_s2", "text_only_s2"):
        assert (tmp_path / "runs" / run / "export" / "microemo.safetensors").is_file(), run
        assert (tmp_path / "runs" / run / "loss.png").is_file()
    assert not (tmp_path / "runs" / "text_only_s1").exists()  # the baseline has no stage 1
    # stage 1 on the short alignment target; the transcript withheld from some clips of the models that
    # see video and audio, never from the text-only baseline
    for run, prompt in (("full_s1", {"label_weight": 3.0, "target": "labels", "transcript_dropout": 0.3}),
                        ("full_s2", {"label_weight": 3.0, "labels_first": True, "transcript_dropout": 0.3}),
                        ("text_only_s2", {"label_weight": 3.0, "labels_first": True})):
        trained = yaml.safe_load((tmp_path / "runs" / run / "config.yaml").read_text())
        assert trained["model"]["prompt"] == prompt, run
    predictions = (tmp_path / "reports" / "full" / "predictions.jsonl").read_text().splitlines()
    # max_new_tokens=24 (bytes) reached prediction; the random model writes no Emotions: line, so one is appended
    answers = [json.loads(x)["text"] for x in predictions]
    assert answers and all(len(a.partition("Emotions:")[0].rstrip("\n")) <= 24 and "Emotions:" in a for a in answers)
    summary = json.loads((tmp_path / "demo_summary.json").read_text())
    assert set(summary["scores"]) == {"full", "text_only"}
    for s in summary["scores"].values():
        assert 0.0 <= s["score"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "# MicroEmo demo" in report and "| full | 5 |" in report and "| text_only | 5 |" in report
    assert "face-only" in report and "runs/full_s2/loss.png" in report and "scores.png" in report
    for name in ("full", "text_only"):
        m = json.loads((tmp_path / "reports" / name / "metrics.json").read_text())
        assert m["n_clips"] == 5
    assert f"report: {tmp_path / 'report.md'}" in out
