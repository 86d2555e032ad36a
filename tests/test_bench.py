"""The benchmarks run and write their results; their numbers are not checked (benchmarks are not
timed tests). The quick run covers preprocess, train and gpu (skipped without CUDA); infer is
left out to keep the test short (its quick run adds about a minute of LLM generation)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is not an installed package

from bench.__main__ import parse_args  # noqa: E402
from bench.gpu import peak_tflops  # noqa: E402
from bench.report import Goal, Result, summary_md, table  # noqa: E402
from bench.train import steady  # noqa: E402

# rows each benchmark must write (by the start of the measurement's name)
EXPECTED = {
    "preprocess": ["stage alone: decode", "stage alone: faces", "stage alone: frame encoder",
                   "stage alone: face encoder", "stage alone: audio encoder", "stage alone: utterances",
                   "pipeline, 1 worker", "pipeline, 2 workers", "1-worker pipeline ÷ slowest stage alone",
                   "2 workers ÷ 1 worker", "memory growth", "object-store spill", "cores busy, 1 worker",
                   "cores busy, 2 worker", "before the thread cap: 2 workers ÷ 1 worker",
                   "2 workers, capped ÷ libraries' default threads"],
    "train": ["stage 1, 1 rank: samples/s", "stage 1, 2 ranks: answer tokens/s", "stage 1: 2 ranks ÷ 1 rank",
              "stage 2, 2 ranks: samples/s", "stage 2: 2 ranks ÷ 1 rank", "step time waiting for data",
              "ZeRO-2, stage 2, 2 ranks", "ZeRO-3, stage 2, 2 ranks", "ZeRO-3 ÷ ZeRO-2 step time"],
    "gpu": ["stage 2 fwd+bwd per GPU"],
}


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_quick_bench_writes_json_results_and_a_summary_table(tmp_path):
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", *EXPECTED, "--quick", "--out", str(tmp_path / "work"),
           "--results", str(results)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (results / "summary.md").read_text()
    assert "| benchmark | measurement | value | goal | result |" in summary
    for name, wanted in EXPECTED.items():
        data = json.loads((results / f"{name}.json").read_text())
        assert data["bench"] == name and data["quick"] is True
        metrics = [r["metric"] for r in data["rows"]]
        for w in wanted:
            assert any(m.startswith(w) for m in metrics), f"{name}: no row {w!r} in {metrics}"
        for r in data["rows"]:
            assert r["status"] in ("pass", "miss", "info", "skipped"), r
            if r["status"] in ("pass", "miss"):
                assert r["goal"] and math.isfinite(r["value"]), r
            assert r["metric"] in summary and r["metric"] in proc.stdout
    gpu = json.loads((results / "gpu.json").read_text())["rows"]
    import torch

    if not torch.cuda.is_available():
        assert gpu[0]["status"] == "skipped" and gpu[0]["note"] == "no CUDA"


def test_steady_rates_leave_out_the_warmup_steps():
    # 2 samples per step; the first step takes 5 s (3 s of it waiting for data), the rest 1 s each
    rows, t, wait, tokens = [], 0.0, 0.0, 0
    for step in range(1, 6):
        t += 5.0 if step == 1 else 1.0
        wait += 3.0 if step == 1 else 0.1
        tokens += 100
        rows.append({"step": step, "samples_per_s": 2 * step / t, "tokens_per_s": tokens / t,
                     "data_wait_frac": wait / t})
    s = steady(rows, warmup=1, samples_per_step=2)
    assert s["samples_per_s"] == pytest.approx(2.0) and s["tokens_per_s"] == pytest.approx(100.0)
    assert s["data_wait_frac"] == pytest.approx(0.1) and s["step_s"] == pytest.approx(1.0) and s["steps"] == 4


def test_rows_compare_with_their_goal_and_render_as_markdown():
    r = Result("demo", quick=True)
    r.add("ratio", 1.8, "×", Goal(">=", 1.7))
    r.add("growth", 20.0, "%", Goal("<", 15.0))
    r.add("rate", 3.0, "frames/s")
    r.skip("gpu thing", "no CUDA")
    assert [row.status for row in r.rows] == ["pass", "miss", "info", "skipped"]
    back = Result.from_dict(json.loads(json.dumps(r.to_dict())))
    md = summary_md([back])
    assert "| demo | ratio | 1.80 × | >= 1.70 | pass |" in md
    assert "| demo | growth | 20.0 % | < 15.0 | miss |" in md
    assert "skipped: no CUDA" in table([back])


def test_unknown_benchmark_name_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["preprocess", "nope"])
    assert exc.value.code == 2 and "unknown benchmark nope" in capsys.readouterr().err
    assert parse_args([]).names == []


def test_gpu_peak_flops_are_looked_up_by_whole_model_name():
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10G") is None  # not the A10
