"""Memory of a whole job seen from outside: a process and all its descendants, sampled in a thread.

Every ``interval_s`` the tree is listed with ``psutil`` and each process's ``/proc/PID/status``
is read (about 30 µs each, so sampling does not slow the job it measures; PSS would need
``smaps_rollup``, tens of milliseconds per large process here). Per job:

- ``peak_rss_sum``: the peak, over samples, of the summed RSS of the tree. An upper bound on
  the job's memory: pages shared between processes (libraries, Ray's shared-memory object
  store) count once per process that maps them;
- ``peak_anon_sum``: the same for ``RssAnon``, the private anonymous memory (heaps, tensors,
  Python objects) that only its process holds: where accumulation or a leak would show;
- per process, its own peak RSS: ``VmHWM``, the kernel's high-water mark, exact between
  samples (e.g. one training rank).

A Ray job started with ``ray.init(address="local")`` is one tree: the driver starts ``gcs_server``,
``raylet`` and Ray's agents, and the raylet starts the worker processes (actors), which start
``ffmpeg``. A torchrun job is the launcher, its elastic agent and the rank processes.

CPU time is sampled alongside (``/proc/PID/stat`` through psutil): each process's own user +
system seconds (the last value seen; a process that exits between two samples loses at most one
interval) and the seconds of the children it has reaped. ``cpu_seconds()`` groups them by
process: the pipeline workers' short-lived ``ffmpeg``/``ffprobe`` children are counted through
their parent's reaped-children time (exact), not sampled.

A child that still shows its parent's command line has not exec'd yet (``subprocess`` forks or
vforks, then execs): its RSS is its parent's pages, so it is left out of that sample (counting
it would double the parent, and inflate the peak with every ffmpeg a worker starts).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import psutil


@dataclass
class ProcessPeak:
    pid: int
    name: str
    cmdline: str
    rank: int | None  # the RANK environment variable (torch.distributed ranks), when set
    peak_rss: int = 0  # bytes: VmHWM where readable, else the largest sampled RSS
    cpu_s: float = 0.0  # own user + system seconds, last seen
    children_cpu_s: float = 0.0  # user + system seconds of the children it reaped, last seen


@dataclass
class TreeMemory:
    peak_rss_sum: int = 0  # bytes: the largest sum of RSS over the tree in one sample
    peak_anon_sum: int = 0  # bytes: the largest sum of RssAnon (private anonymous memory)
    samples: int = 0
    processes: dict[int, ProcessPeak] = field(default_factory=dict)
    root_pid: int | None = None

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds by kind of process: ``driver`` (the root), ``ray worker`` (``ray::`` processes:
        actors, tasks, idle workers), ``ffmpeg`` (reaped children of the Ray workers: decoders),
        Ray's own services by name (``raylet``, ``gcs_server``, agents), ``other``."""
        out: dict[str, float] = {}
        for p in self.processes.values():
            if p.name.startswith(("ffmpeg", "ffprobe")):
                continue  # counted through the parent's reaped-children time
            if p.pid == self.root_pid:
                kind = "driver"
            elif p.name.startswith("ray::") or "default_worker.py" in p.cmdline:
                kind = "ray worker"
                out["ffmpeg"] = out.get("ffmpeg", 0.0) + p.children_cpu_s
            elif p.name in ("raylet", "gcs_server") or "ray" in p.name.lower() or "/ray/" in p.cmdline:
                kind = p.name if p.name in ("raylet", "gcs_server") else "ray services"
            else:
                kind = "other"
            out[kind] = out.get(kind, 0.0) + p.cpu_s
        return out

    def ranks(self) -> dict[int, int]:
        """Peak RSS (bytes) per torch.distributed rank seen in the tree."""
        out: dict[int, int] = {}
        for p in self.processes.values():
            if p.rank is not None and "torch.distributed.run" not in p.cmdline:
                out[p.rank] = max(out.get(p.rank, 0), p.peak_rss)
        return out


class TreeSampler:
    """``with TreeSampler(pid) as s: ...`` samples ``pid`` (default: this process) and its
    descendants every ``interval_s`` until the block ends; the result is ``s.memory``.
    ``include_root=False`` leaves the root out (e.g. this benchmark process, when only the
    processes it starts are the job)."""

    def __init__(self, pid: int | None = None, interval_s: float = 0.25, include_root: bool = True):
        self.root = psutil.Process(pid)
        self.interval_s = interval_s
        self.include_root = include_root
        self.memory = TreeMemory(root_pid=self.root.pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.sample()
            if self._stop.wait(self.interval_s):
                self.sample()
                return

    def sample(self) -> None:
        try:
            procs = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        cmdlines = {}
        for p in [self.root, *procs]:
            try:
                cmdlines[p.pid] = (p.cmdline(), p.ppid())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        if self.include_root:
            procs.insert(0, self.root)
        rss_sum = anon_sum = 0
        for p in procs:
            cmd, ppid = cmdlines.get(p.pid, (None, None))
            if cmd is None or (ppid in cmdlines and cmdlines[ppid][0] == cmd and p.pid != self.root.pid):
                # not yet exec'd (fork / vfork, then exec): its RSS is its parent's pages
                continue
            try:
                rss, anon, hwm = _status(p)
                known = self.memory.processes.get(p.pid)
                if known is None or known.rank is None:  # the environment is read once a rank is found
                    known = self.memory.processes[p.pid] = ProcessPeak(
                        p.pid, p.name(), " ".join(cmd)[:300], _rank(p), known.peak_rss if known else 0,
                        known.cpu_s if known else 0.0, known.children_cpu_s if known else 0.0)
                t = p.cpu_times()
                known.cpu_s = max(known.cpu_s, t.user + t.system)
                known.children_cpu_s = max(known.children_cpu_s, t.children_user + t.children_system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ProcessLookupError):
                continue
            rss_sum += rss
            anon_sum += anon
            known.peak_rss = max(known.peak_rss, hwm, rss)
        m = self.memory
        m.peak_rss_sum, m.peak_anon_sum = max(m.peak_rss_sum, rss_sum), max(m.peak_anon_sum, anon_sum)
        m.samples += 1


def _status(p: psutil.Process) -> tuple[int, int, int]:
    """(RSS, RssAnon, VmHWM) in bytes from /proc/PID/status; psutil's RSS for all three elsewhere."""
    try:
        with open(f"/proc/{p.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "VmHWM")))
    except FileNotFoundError:
        raise ProcessLookupError(p.pid) from None
    except OSError:
        fields = {}
    if "VmRSS" not in fields:  # not Linux, or a zombie
        rss = p.memory_info().rss
        return rss, rss, rss

    def kib(key: str) -> int:
        return int(fields[key].split()[0]) * 1024 if key in fields else 0

    return kib("VmRSS"), kib("RssAnon"), kib("VmHWM")


def _rank(p: psutil.Process) -> int | None:
    try:
        value = p.environ().get("RANK")
    except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
        return None
    return int(value) if value is not None and value.isdigit() else None
