
import pytest

from jobs.metrics import MetricsLogger, NonFiniteLoss, check_finite, read_metrics


def test_jsonl_and_loss_curve(tmp_path):
    log = MetricsLogger(tmp_path / "run", stage=1)
    for step in range(1, 6):
        log.log(step, loss=1.0 / step, lr=1e-3 * step, grad_norm=0.5, samples_per_s=3.0)
    png = log.close()
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5] and rows[0]["stage"] == 1
    assert rows[-1]["loss"] == pytest.approx(0.2)
    assert png.is_file() and png.stat().st_size > 5000


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", enabled=False)
    log.log(1, loss=1.0)
    assert log.close() is None and not (tmp_path / "run").exists()


def test_non_finite_values_stop_naming_the_step():
    check_finite(3, loss=0.5, grad_norm=1.0)
    with pytest.raises(NonFiniteLoss, match="loss is nan at step 7"):
        check_finite(7, loss=float("nan"))
    with pytest.raises(NonFiniteLoss, match="grad_norm is inf at step 8"):
        check_finite(8, loss=1.0, grad_norm=float("inf"))


def test_tensorboard_events_are_written(tmp_path):
    log = MetricsLogger(tmp_path / "run")
    log.log(1, loss=2.0)
    log.close()
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
