"""`microemo demo` end to end, small: synth, then preprocess, with the embedded models."""

import pyarrow.parquet as pq
import pytest

from jobs.cli import main

pytestmark = pytest.mark.integration


def test_demo_runs_every_built_stage_and_shows_results(tmp_path, capsys, tools):
    assert main(["demo", "--out", str(tmp_path), "--videos", "3", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "== synthetic corpus ==" in out and "3 clips" in out
    assert "== feature store ==" in out and "3 processed" in out
    assert "micro-expression preview" in out and (tmp_path / "corpus_preview.png").stat().st_size > 10_000
    videos = pq.read_table(str(tmp_path / "features" / "videos")).to_pylist()
    assert sorted(v["status"] for v in videos) == ["ok"] * 3
    assert (tmp_path / "features_config.yaml").is_file()
