"""Benchmark results: one row per measured number (value, goal, pass/miss), saved as JSON per
benchmark and rendered as one Markdown table.

A row's ``status``:

- ``pass`` / ``miss``: the value met / did not meet its goal (benchmarks measure, they never fail);
- ``info``: a number without a goal (context for the ones with goals);
- ``skipped``: not measurable here (``note`` says why, e.g. "no CUDA");
- ``error``: the benchmark raised (``note`` holds the exception); ``python -m bench`` exits 1.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

OPS = {">=": lambda v, g: v >= g, "<=": lambda v, g: v <= g, "<": lambda v, g: v < g, ">": lambda v, g: v > g}


@dataclass
class Goal:
    op: str  # one of OPS
    value: float

    def met(self, value: float) -> bool:
        return OPS[self.op](value, self.value)

    def __str__(self) -> str:
        return f"{self.op} {_fmt(self.value)}"


@dataclass
class Row:
    metric: str
    value: float | None
    unit: str = ""
    goal: Goal | None = None
    status: str = "info"
    note: str = ""


@dataclass
class Result:
    """What one benchmark measured: table rows plus the raw numbers behind them (``details``)."""

    bench: str
    quick: bool
    rows: list[Row] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    started_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    seconds: float = 0.0
    machine: dict = field(default_factory=lambda: machine())

    def add(self, metric: str, value: float | None, unit: str = "", goal: Goal | None = None, note: str = "") -> Row:
        """Append a row; its status follows from value and goal (a missing value is ``skipped``)."""
        if value is None:
            status = "skipped"
        elif goal is None:
            status = "info"
        else:
            status = "pass" if goal.met(value) else "miss"
        row = Row(metric, None if value is None else float(value), unit, goal, status, note)
        self.rows.append(row)
        return row

    def skip(self, metric: str, why: str) -> Row:
        row = Row(metric, None, status="skipped", note=why)
        self.rows.append(row)
        return row

    def error(self, metric: str, exc: BaseException) -> Row:
        row = Row(metric, None, status="error", note=f"{type(exc).__name__}: {exc}"[:300])
        self.rows.append(row)
        return row

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        rows = [Row(**{**r, "goal": Goal(**r["goal"]) if r.get("goal") else None}) for r in d.get("rows", [])]
        return cls(**{**d, "rows": rows})


def machine() -> dict:
    """Where the numbers were measured: CPUs, load, platform, library versions, GPU if any."""
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on Linux/macOS
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:  # pragma: no cover
        pass
    return info


def save(result: Result, results_dir: Path) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result.bench}.json"
    path.write_text(json.dumps(result.to_dict(), indent=1) + "\n")
    return path


def load_all(results_dir: Path, order: list[str]) -> list[Result]:
    """Every ``<name>.json`` in ``results_dir`` (benchmarks in ``order`` first)."""
    found = {p.stem: p for p in results_dir.glob("*.json")}
    names = [n for n in order if n in found] + sorted(set(found) - set(order))
    return [Result.from_dict(json.loads(found[n].read_text())) for n in names]


def table(results: list[Result]) -> str:
    """The Markdown table: one line per row, grouped by benchmark."""
    lines = ["| benchmark | measurement | value | goal | result |", "|---|---|---|---|---|"]
    for r in results:
        for row in r.rows:
            value = "—" if row.value is None else f"{_fmt_against(row.value, row.goal)} {row.unit}".rstrip()
            result = row.status + (f": {row.note}" if row.note else "")
            lines.append(f"| {r.bench} | {row.metric} | {value} | {row.goal or ''} | {result} |")
    return "\n".join(lines)


def summary_md(results: list[Result]) -> str:
    """``summary.md``: when and where each benchmark ran, then the table."""
    head = ["# Benchmark results", "", "Written by `python -m bench` (see docs/benchmarks.md for what each number "
            "means). Ratios are measured side by side in one run; absolute numbers depend on the machine.", ""]
    for r in results:
        m = r.machine
        head.append(f"- **{r.bench}**: {'quick' if r.quick else 'full'} run, {r.started_at}, {r.seconds:.0f} s; "
                    f"{m.get('cpus')} CPUs (load {m.get('load_avg_1m', '?')} at start), GPU: {m.get('gpu') or 'none'}")
    return "\n".join(head + ["", table(results), ""])


def _fmt_against(v: float, goal: Goal | None) -> str:
    """``_fmt(v)``, with more decimals where it would print the same as a goal it does not equal
    (1.698 against >= 1.7 must not read "1.70 ... miss")."""
    text = _fmt(v)
    if goal is not None and v != goal.value:
        for places in (3, 4, 5):
            if text != _fmt(goal.value) and not (goal.met(v) ^ goal.met(float(text.replace(",", "")))):
                break
            text = f"{v:.{places}f}"
    return text


def _fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if v == 0 or abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    if abs(v) >= 0.01:
        return f"{v:.2f}"
    return f"{v:.2g}"
