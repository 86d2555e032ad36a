"""Measurements that run in a process of their own: ``python -m bench.<module> <args> RESULT_JSON``.

A child process gets the environment the measured code has in production (e.g. one OpenMP
thread, as in a Ray worker), its output goes to a log file, and its whole process tree is
sampled for memory while it runs (``bench.memory``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.memory import TreeMemory, TreeSampler

REPO = Path(__file__).resolve().parents[1]


def run(module: str, args: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None
        ) -> tuple[dict, TreeMemory]:
    """Run ``python -m module *args RESULT`` and return (the JSON it wrote to RESULT, its memory).

    Output goes to ``log_dir/<name>.log``; a non-zero exit raises with the log's tail.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path, result = log_dir / f"{name}.log", (log_dir / f"{name}.json").resolve()
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", module, *args, str(result)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env if env is not None else dict(os.environ), stdout=log,
                                stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"{module} ({name}) exited {rc}; last output ({log_path}):\n{log_path.read_text()[-2000:]}")
    return json.loads(result.read_text()), sampler.memory


def write_result(path: str, data: dict) -> None:
    """For the child: its result, as JSON."""
    with open(path, "w") as f:
        json.dump(data, f)
