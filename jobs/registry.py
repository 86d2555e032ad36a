"""The model registry of scheduled retraining: promoted models, the ``current`` pointer, a history
of every decision, and a lock. A local directory or any fsspec URL (``s3://bucket/prefix``)::

    current.json              the promoted model: id, path, score, metric, held-out fingerprint,
                              the feature-store shards it was trained on, attempt, parent
    models/<id>/              microemo.safetensors, model_config.json, adapter/ (the export of the
                              training run) + card.json (metrics, data, parent, config), written last:
                              a model directory without card.json is incomplete
    history.jsonl             one JSON object per line and decision, oldest first
    attempts/<attempt>/       attempt.json, eval.json, decision.json of one retraining attempt (and,
                              for a local registry, its training runs)
    lock                      who holds the registry (token, host, pid, started_at, renewed_at, ttl_s)

Atomicity: ``current.json`` and ``history.jsonl`` are replaced whole, locally by writing a temporary
file and ``os.replace``, on S3 by one PUT (a single PUT is atomic there: readers see the old object
or the new one). History records carry an ``id``; recording an id twice is a no-op, which makes
every step that ends in a history record safe to repeat.

The lock (``RegistryLock``): only its holder trains and promotes.
- local: ``O_CREAT | O_EXCL`` creates ``lock``; a lock whose owner is a dead process on this host,
  or whose ``renewed_at`` is older than its ``ttl_s``, is stale and is broken (under a short-lived
  ``lock.break`` guard, so two breakers cannot both win);
- S3: ``PutObject`` with ``If-None-Match: *`` creates it; a stale lock is taken over with
  ``If-Match: <its ETag>`` (compare-and-swap: of two runs breaking the same stale lock one wins);
  renewals and the release are conditional on the holder's ETag too;
- other fsspec backends: a best-effort lease (write, then read back the token), not exclusive
  under a race; use a local path or S3 for the registry.
The holder renews ``renewed_at`` from a background thread every ``ttl_s / 4`` (at most 60 s), so a
long training keeps the lock and a crashed run's lock goes stale after ``ttl_s``.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

CURRENT = "current.json"
HISTORY = "history.jsonl"
LOCK = "lock"
CARD = "card.json"
BREAK_GUARD_TTL_S = 60.0


def utcnow() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class LockHeld(RuntimeError):
    """Another run holds the registry lock; ``owner`` is its lock record."""

    def __init__(self, owner: dict):
        self.owner = owner
        since = owner.get("started_at", "?")
        super().__init__(f"held by {owner.get('host', '?')} pid {owner.get('pid', '?')} since {since} "
                         f"(renewed {owner.get('renewed_at', '?')}, ttl {owner.get('ttl_s', '?')} s)")


class LockLost(RuntimeError):
    """This run's lock was broken or replaced by another run (it stalled past the TTL)."""


class Registry:
    """One registry: ``url`` is a local path or an fsspec URL; ``storage_options`` go to fsspec."""

    def __init__(self, url: str, storage_options: dict | None = None):
        import fsspec
        from fsspec.implementations.local import LocalFileSystem

        self.url = url.rstrip("/") or url
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.local = isinstance(self.fs, LocalFileSystem)
        protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
        self.s3 = any(p in ("s3", "s3a") for p in protocols)
        self.root = os.path.abspath(root) if self.local else root.rstrip("/")
        if self.local:
            os.makedirs(self.root, exist_ok=True)

    # ------------------------------------------------------------------ paths and small files
    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def uri(self, *parts: str) -> str:
        """A printable location (absolute path locally, ``s3://...`` remotely)."""
        p = self.path(*parts)
        return p if self.local else self.fs.unstrip_protocol(p)

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.path(rel))
        except FileNotFoundError:
            return None

    def read_json(self, rel: str) -> Any:
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Replace ``rel`` atomically (temp file + os.replace locally; one PUT on object stores)."""
        path = self.path(rel)
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, (json.dumps(obj, indent=1, default=str) + "\n").encode())

    # ------------------------------------------------------------------ pointer
    def current(self) -> dict | None:
        """The promoted model's pointer record, or None for an empty registry."""
        return self.read_json(CURRENT)

    def set_current(self, entry: dict) -> None:
        self.write_json(CURRENT, entry)

    # ------------------------------------------------------------------ models
    def model_rel(self, model_id: str) -> str:
        _check_id(model_id)
        return posixpath.join("models", model_id)

    def model_complete(self, model_id: str) -> bool:
        return self.read_bytes(posixpath.join(self.model_rel(model_id), CARD)) is not None

    def card(self, model_id: str) -> dict | None:
        return self.read_json(posixpath.join(self.model_rel(model_id), CARD))

    def publish(self, model_id: str, src: str | Path, card: dict) -> str:
        """Copy a weights directory into ``models/<id>/``, then write ``card.json`` (the completeness
        marker). Idempotent: a complete model is left as it is. Returns the model's URI."""
        rel = self.model_rel(model_id)
        if not self.model_complete(model_id):
            src = Path(src)
            for f in sorted(p for p in src.rglob("*") if p.is_file()):
                dst = self.path(rel, *f.relative_to(src).parts)
                if self.local:
                    import shutil

                    os.makedirs(os.path.dirname(dst), exist_ok=True)
                    shutil.copyfile(f, dst)
                else:
                    self.fs.put_file(str(f), dst)
            self.write_json(posixpath.join(rel, CARD), card)
        return self.uri(rel)

    def fetch(self, model_id: str, dest: str | Path) -> Path:
        """A local directory holding the model's files: the registry's own folder when local, else a
        download into ``dest`` (completed downloads are reused)."""
        rel = self.model_rel(model_id)
        if not self.model_complete(model_id):
            raise FileNotFoundError(f"{self.uri(rel)}: no complete model (no {CARD})")
        if self.local:
            return Path(self.path(rel))
        dest = Path(dest)
        if (dest / CARD).is_file():
            return dest
        import shutil

        tmp = dest.with_name(dest.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        base = self.path(rel)
        for remote in sorted(self.fs.find(base)):
            local = tmp / posixpath.relpath(remote, base)
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(remote, str(local))
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
        return dest

    def models(self) -> list[str]:
        """Ids of the complete models, sorted (ids start with their creation time)."""
        try:
            found = self.fs.glob(self.path("models", "*", CARD))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(posixpath.dirname(p)) for p in found)

    # ------------------------------------------------------------------ history
    def history(self) -> list[dict]:
        data = self.read_bytes(HISTORY)
        if not data:
            return []
        return [json.loads(line) for line in data.decode().splitlines() if line.strip()]

    def record(self, entry: dict, merge: bool = False) -> bool:
        """Append ``entry`` (which has an ``id``) to the history. An id already there is left alone,
        or, with ``merge``, updated with the entry's fields. Call it under the lock. Returns whether
        the history changed."""
        if "id" not in entry:
            raise ValueError("history entries need an id")
        entry = {"time": utcnow(), **entry}
        rows = self.history()
        for i, row in enumerate(rows):
            if row.get("id") == entry["id"]:
                if not merge:
                    return False
                rows[i] = {**row, **entry, "time": row.get("time", entry["time"])}
                break
        else:
            rows.append(entry)
        self.write_bytes(HISTORY, "".join(json.dumps(r, default=str) + "\n" for r in rows).encode())
        return True

    # ------------------------------------------------------------------ attempts
    def attempt_rel(self, attempt: str, name: str = "") -> str:
        _check_id(attempt)
        return posixpath.join("attempts", attempt, name) if name else posixpath.join("attempts", attempt)

    def decided_attempts(self) -> list[str]:
        """Attempts that wrote a decision.json (sorted)."""
        try:
            self.fs.invalidate_cache()
            found = self.fs.glob(self.path("attempts", "*", "decision.json"))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(posixpath.dirname(p)) for p in found)

    # ------------------------------------------------------------------ lock
    def lock(self, ttl_s: float = 900.0, note: str = "") -> RegistryLock:
        return RegistryLock(self, ttl_s, note)


def _check_id(name: str) -> None:
    """Ids become path components: no separators, no dot-dot, nothing a shell or URL treats specially."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", name or "") or ".." in name:
        raise ValueError(f"invalid registry id {name!r}")


# ---------------------------------------------------------------------------- the lock

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_reason(owner: dict, now: float | None = None) -> str | None:
    """Why a lock record is stale (its process is gone from this host, or it was not renewed within
    its TTL), or None when it is live."""
    now = time.time() if now is None else now
    if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int) \
            and not _pid_alive(owner["pid"]):
        return f"process {owner['pid']} on this host ({owner['host']}) is gone"
    renewed = owner.get("renewed_ts", owner.get("started_ts"))
    ttl = float(owner.get("ttl_s", 0) or 0)
    if renewed is None:
        return "the lock record has no timestamps"
    if now - float(renewed) > ttl:
        return f"not renewed for {now - float(renewed):.0f} s (ttl {ttl:.0f} s)"
    return None


def _precondition_failed(exc: BaseException) -> bool:
    if isinstance(exc, FileExistsError):
        return True
    cause = exc.__cause__ or exc.__context__
    response = getattr(cause, "response", None) or getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") or \
        "pre-condition" in str(exc).lower() or "precondition" in str(exc).lower()


class RegistryLock:
    """Exclusive hold on a registry; see the module docstring for the protocol per backend.

    ``acquire()`` raises ``LockHeld`` when another live run holds it and returns the notes of any
    stale lock it broke; ``check()`` raises ``LockLost`` if the lock is no longer this run's.
    """

    def __init__(self, registry: Registry, ttl_s: float, note: str = ""):
        self.reg, self.ttl_s, self.note = registry, float(ttl_s), note
        self.token = uuid.uuid4().hex
        self.path = registry.path(LOCK)
        self.etag: str | None = None
        self.held = False
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()
        self._started: float | None = None

    # -------------------------------------------------------------- record
    def _record(self) -> dict:
        now = time.time()
        started = self._started or now
        self._started = started
        return {"token": self.token, "host": socket.gethostname(), "pid": os.getpid(), "note": self.note,
                "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), "started_ts": started,
                "renewed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), "renewed_ts": now,
                "ttl_s": self.ttl_s}

    def _body(self) -> bytes:
        return json.dumps(self._record()).encode()

    # -------------------------------------------------------------- backend primitives
    def _read(self) -> tuple[dict | None, str | None]:
        """(lock record, version) — the version is the S3 ETag, or the token elsewhere."""
        if self.reg.s3:
            from fsspec.asyn import sync

            bucket, key, _ = self.reg.fs.split_path(self.path)

            async def get():
                resp = await self.reg.fs._call_s3("get_object", Bucket=bucket, Key=key)
                try:
                    return await resp["Body"].read(), resp["ETag"]
                finally:
                    resp["Body"].close()

            try:
                body, etag = sync(self.reg.fs.loop, get)
            except FileNotFoundError:
                return None, None
            return _parse(body), etag
        body = self.reg.read_bytes(LOCK)
        if body is None:
            return None, None
        rec = _parse(body)
        return rec, rec.get("token")

    def _create(self) -> bool:
        """Create the lock if absent; False if it exists."""
        if self.reg.local:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(self._body())
                f.flush()
                os.fsync(f.fileno())
            return True
        if self.reg.s3:
            return self._s3_put(IfNoneMatch="*")
        # best effort elsewhere: write if absent, then read back our token
        if self.reg.read_bytes(LOCK) is not None:
            return False
        self.reg.fs.pipe_file(self.path, self._body())
        rec, _ = self._read()
        return bool(rec and rec.get("token") == self.token)

    def _s3_put(self, **cond) -> bool:
        bucket, key, _ = self.reg.fs.split_path(self.path)
        try:
            resp = self.reg.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=self._body(), **cond)
        except OSError as exc:
            if _precondition_failed(exc):
                return False
            raise
        self.etag = resp.get("ETag")
        return True

    def _take_over(self, stale: dict, version: str | None) -> bool:
        """Replace a stale lock with ours, atomically with respect to other breakers."""
        if self.reg.s3:
            return self._s3_put(IfMatch=version)
        if not self.reg.local:
            self.reg.fs.rm_file(self.path)
            return self._create()
        guard = self.path + ".break"
        for _ in range(2):
            try:
                fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                break
            except FileExistsError:
                try:  # a breaker that died while holding the guard
                    if time.time() - os.path.getmtime(guard) > BREAK_GUARD_TTL_S:
                        os.unlink(guard)
                        continue
                except FileNotFoundError:
                    continue
                return False
        else:
            return False
        try:
            rec, _ = self._read()
            if rec is not None and rec.get("token") != stale.get("token"):
                return False  # someone else replaced it meanwhile
            if rec is not None:
                os.unlink(self.path)
            return self._create()
        finally:
            try:
                os.unlink(guard)
            except FileNotFoundError:
                pass

    # -------------------------------------------------------------- public
    def acquire(self) -> list[dict]:
        """Take the lock; returns the stale locks broken on the way (their records + reason)."""
        broken = []
        for _ in range(3):
            if self._create():
                self._hold()
                return broken
            rec, version = self._read()
            if rec is None:
                continue  # released in between: try again
            if rec.get("token") is None and self.reg.local and _age(self.path) < 10:
                raise LockHeld(rec)  # being written by its creator right now
            reason = stale_reason(rec)
            if reason is None:
                raise LockHeld(rec)
            if self._take_over(rec, version):
                broken.append({"previous_owner": {k: rec.get(k) for k in ("host", "pid", "started_at", "renewed_at",
                                                                           "note")}, "reason": reason})
                self._hold()
                return broken
        rec, _ = self._read()
        raise LockHeld(rec or {})

    def _hold(self) -> None:
        self.held = True
        self._thread = threading.Thread(target=self._renew_loop, daemon=True, name="microemo-registry-lock")
        self._thread.start()

    def _renew_loop(self) -> None:
        every = max(0.5, min(60.0, self.ttl_s / 4))
        while not self._stop.wait(every):
            try:
                self.renew()
            except Exception:  # a transient storage error: try again next period
                continue

    def renew(self) -> None:
        with self._mutex:
            if not self.held or self.lost:
                return
            if self.reg.s3:
                if not self._s3_put(IfMatch=self.etag):
                    self.lost = True
                return
            rec, _ = self._read()
            if rec is None or rec.get("token") != self.token:
                self.lost = True
                return
            self.reg.write_bytes(LOCK, self._body())

    def check(self) -> None:
        """Raise ``LockLost`` unless this run still holds the lock (call before promoting)."""
        rec, _ = self._read()
        if self.lost or rec is None or rec.get("token") != self.token:
            self.lost = True
            raise LockLost(f"the registry lock is no longer ours (now: {rec and rec.get('host')} pid "
                           f"{rec and rec.get('pid')}); not promoting")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._mutex:
            if not self.held:
                return
            self.held = False
            if self.lost:
                return
            if self.reg.s3:
                bucket, key, _ = self.reg.fs.split_path(self.path)
                try:
                    self.reg.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self.etag)
                except OSError as exc:
                    if not _precondition_failed(exc):  # a store without conditional deletes
                        rec, _ = self._read()
                        if rec and rec.get("token") == self.token:
                            self.reg.fs.rm_file(self.path)
                return
            rec, _ = self._read()
            if rec is not None and rec.get("token") == self.token:
                self.reg.fs.rm_file(self.path)

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _age(path: str) -> float:
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return 0.0


def _parse(body: bytes) -> dict:
    try:
        rec = json.loads(body)
    except ValueError:
        return {"token": None, "note": "unreadable lock record"}
    return rec if isinstance(rec, dict) else {"token": None}
