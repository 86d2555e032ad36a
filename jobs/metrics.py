"""Training metrics: JSONL (always), TensorBoard (when installed), a loss-curve PNG, and
NaN/inf detection that stops training naming the step.

Only rank 0 writes; other ranks get a logger whose methods do nothing, so training code can
call it unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class NonFiniteLoss(FloatingPointError):
    """The loss (or gradient norm) became NaN or infinite; the message names the step."""


def check_finite(step: int, **values: float) -> None:
    for name, value in values.items():
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteLoss(f"{name} is {value} at step {step}; stopping (lower the learning rate, "
                                f"check the inputs of that step, or resume from the last checkpoint)")


class MetricsLogger:
    """Appends one JSON object per logged step to ``run_dir/metrics.jsonl`` and mirrors scalars
    to TensorBoard under ``run_dir/tensorboard``; ``close`` draws ``run_dir/loss.png``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, stage: int | None = None):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.stage = stage
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional; JSONL is the record
            self._tb = None

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **{k: _plain(v) for k, v in scalars.items()}}
        if self.stage is not None:
            row["stage"] = self.stage
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> Path | None:
        if not self.enabled:
            return None
        if self._tb is not None:
            self._tb.close()
        return plot_loss(self.path, self.run_dir / "loss.png")


def _plain(v):
    try:
        return float(v) if not isinstance(v, (str, bool)) else v
    except (TypeError, ValueError):
        return str(v)


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Loss (and learning rate) against step; None when nothing was logged."""
    rows = [r for r in read_metrics(metrics_jsonl) if "loss" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any("lr" in r for r in rows):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in rows if "lr" in r], [r["lr"] for r in rows if "lr" in r], color="tab:orange",
                 lw=0.8, alpha=0.7, label="lr")
        ax2.set_ylabel("learning rate")
    ax.set_title(f"{Path(metrics_jsonl).parent.name}: training loss")
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png
