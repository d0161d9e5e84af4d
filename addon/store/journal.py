"""Write-ahead journal of store ops: a crash (even kill -9) or an outage loses no metered dollar.

Every op the writer queues for MongoDB is first appended here (one `write()` to the OS, so a killed
process loses nothing; `fsync` at most every `fsync_interval_s` against power loss). When MongoDB
acknowledges a batch, an ack record is appended and fully acknowledged segments are deleted, oldest
first. Layout: `<root>/<owner>/seg-<n>.jsonl`, one owner directory per process, held by an `flock` on
`<owner>/lock`; the kernel drops that lock when the process dies, however it dies, so the next start
(of any sidecar sharing the data directory) knows which journals are orphaned and replays them.

Lines: `{"s": seq, "op": {...}}` for an op, `{"a": [[lo, hi], ...]}` for acknowledged seq ranges.
Segments are deleted only as a prefix, and an ack is always written to the same or a later segment
than its ops, so an op never outlives its ack record (a replay never applies an acknowledged op).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SEGMENT_OPS = 4096  # ops per segment file; a segment goes once all of them are acknowledged
WARN_EVERY_S = 60.0


def _ranges(seqs: list[int]) -> list[list[int]]:
    """[1,2,3,7,8] -> [[1,3],[7,8]]: ack records stay small for contiguous batches."""
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


class Journal:
    """This process's journal. `append` is cheap (one JSON encode, one write syscall) and thread-safe."""

    def __init__(self, root: Path, *, fsync_interval_s: float = 0.1, max_bytes: int = 256 << 20,
                 segment_ops: int = SEGMENT_OPS) -> None:
        self.root = root
        self.fsync_interval_s = max(0.0, float(fsync_interval_s))
        self.max_bytes = int(max_bytes)
        self.segment_ops = segment_ops
        self._lock = threading.Lock()
        self._seq = 0
        self._seg = -1
        self._fd = -1
        self._segments: dict[int, int] = {}  # segment index -> unacknowledged ops in it
        self._sizes: dict[int, int] = {}
        self._bytes = 0
        self._dirty = False
        self._retired_fds: list[int] = []
        self._full_since: float | None = None
        self._last_warn = 0.0
        self.unjournaled = 0  # ops refused because the journal hit its size cap
        self._lock_fd = -1
        self._stop = threading.Event()
        self._syncer: threading.Thread | None = None
        self.dir = self._claim_owner_dir()

    # -- ownership ----------------------------------------------------------------------------
    def _claim_owner_dir(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            d = self.root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
            d.mkdir()
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a starting peer took the fresh directory for an orphan: pick another
                os.close(fd)
                continue
            self._lock_fd = fd
            return d
        raise OSError(f"cannot claim a journal directory under {self.root}")

    # -- request path -------------------------------------------------------------------------
    def append(self, op: dict[str, Any]) -> int | None:
        """Journal one op; returns its seq, or None when the journal is full (the op is then memory-only)."""
        body = json.dumps(op, separators=(",", ":"))
        with self._lock:
            if self._fd == -2:  # closed
                return None
            seq = self._seq + 1
            line = f'{{"s":{seq},"op":{body}}}\n'.encode()
            if self._bytes + len(line) > self.max_bytes:
                self._refuse()
                return None
            if self._full_since is not None:
                log.warning("💾 [OpenHands/Store] journal has room again after %.0fs; %d update(s) in that time "
                            "were not crash-safe", time.time() - self._full_since, self.unjournaled)
                self._full_since = None
            seg = (seq - 1) // self.segment_ops
            if seg != self._seg:
                self._open_segment(seg)
            os.write(self._fd, line)
            self._seq = seq
            self._segments[seg] = self._segments.get(seg, 0) + 1
            self._sizes[seg] = self._sizes.get(seg, 0) + len(line)
            self._bytes += len(line)
            self._dirty = True
            if self.fsync_interval_s == 0:
                os.fsync(self._fd)
                self._dirty = False
            return seq

    def _refuse(self) -> None:
        self.unjournaled += 1
        now = time.time()
        if self._full_since is None:
            self._full_since = now
        if now - self._last_warn >= WARN_EVERY_S:
            self._last_warn = now
            log.error("🚨💾 [OpenHands/Store] JOURNAL FULL (%d MB cap, %s): %d update(s) so far are kept in memory "
                      "only and would be LOST if the sidecar crashed; MongoDB has not acknowledged writes for "
                      "%.0fs — restore the database or raise openhands_journal_max_mb",
                      self.max_bytes >> 20, self.dir, self.unjournaled, now - self._full_since)

    def _open_segment(self, seg: int) -> None:
        if self._fd >= 0 and self.fsync_interval_s == 0:
            os.close(self._fd)  # every write was fsynced already
        elif self._fd >= 0:
            self._retired_fds.append(self._fd)  # fsynced and closed by the syncer, off the request path
        self._fd = os.open(self.dir / f"seg-{seg:08d}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._seg = seg
        self._segments.setdefault(seg, 0)
        self._sizes.setdefault(seg, 0)

    # -- writer thread ------------------------------------------------------------------------
    def ack(self, seqs: list[int], *, discarded: bool = False) -> None:
        """MongoDB has these ops (or they were deliberately dropped): record it, delete finished segments."""
        seqs = [s for s in seqs if s]
        if not seqs:
            return
        with self._lock:
            if self._fd < 0:
                return
            line = json.dumps({"a": _ranges(seqs)}, separators=(",", ":")).encode() + b"\n"
            os.write(self._fd, line)
            self._sizes[self._seg] += len(line)
            self._bytes += len(line)
            self._dirty = True
            for s in seqs:
                seg = (s - 1) // self.segment_ops
                if seg in self._segments:
                    self._segments[seg] -= 1
            self._drop_finished_prefix()

    def _drop_finished_prefix(self) -> None:
        for seg in sorted(self._segments):
            if seg >= self._seg or self._segments[seg] > 0:
                return
            del self._segments[seg]
            self._bytes -= self._sizes.pop(seg, 0)
            try:
                os.unlink(self.dir / f"seg-{seg:08d}.jsonl")
            except FileNotFoundError:
                pass

    @property
    def pending(self) -> int:
        with self._lock:
            return sum(self._segments.values())

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def start(self) -> None:
        if self.fsync_interval_s > 0 and self._syncer is None:
            self._syncer = threading.Thread(target=self._sync_loop, name="openhands-journal-fsync", daemon=True)
            self._syncer.start()

    def _sync_loop(self) -> None:
        while not self._stop.wait(self.fsync_interval_s):
            self.sync()

    def sync(self) -> None:
        """fsync what was written (and close retired segment files); never holds the append lock while syncing."""
        with self._lock:
            fd, dirty = self._fd, self._dirty
            retired, self._retired_fds = self._retired_fds, []
            self._dirty = False
            if dirty and fd >= 0:
                fd = os.dup(fd)  # a concurrent close must not pull the descriptor from under the fsync
            else:
                fd = -1
        for r in retired:
            try:
                os.fsync(r)
            finally:
                os.close(r)
        if fd >= 0:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> int:
        """Stop: fsync; a journal with nothing unacknowledged is removed. Returns the ops left in it."""
        self._stop.set()
        if self._syncer is not None:
            self._syncer.join(timeout=2)
        self.sync()
        with self._lock:
            left = sum(self._segments.values())
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = -2
        if left == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock: the next start may replay what is left
            self._lock_fd = -1
        return left


class Orphan:
    """A dead process's journal, locked by us while we replay it."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.dir = path
        self._lock_fd = lock_fd

    def segments(self) -> list[Path]:
        return sorted(self.dir.glob("seg-*.jsonl"))

    def pending_ops(self) -> list[tuple[int, dict[str, Any]]]:
        """Unacknowledged ops in seq order; a torn last line (killed mid-write) is skipped."""
        ops: dict[int, dict[str, Any]] = {}
        acked: list[list[int]] = []
        for seg in self.segments():
            for raw in seg.read_bytes().splitlines():
                try:
                    rec = json.loads(raw)
                except ValueError:
                    log.warning("💾 [OpenHands/Store] skipping a torn journal line in %s", seg.name)
                    continue
                if "s" in rec and isinstance(rec.get("op"), dict):
                    ops[int(rec["s"])] = rec["op"]
                elif "a" in rec:
                    acked.extend(rec["a"])
        for lo, hi in acked:
            for s in range(int(lo), int(hi) + 1):
                ops.pop(s, None)
        return sorted(ops.items())

    def keys_in_use(self) -> set[str]:
        """Keys metered in the journal's recent segments, acknowledged or not: the keys in use at the stop."""
        keys: set[str] = set()
        for seg in self.segments():
            for raw in seg.read_bytes().splitlines():
                try:
                    op = json.loads(raw).get("op")
                except ValueError:
                    continue
                if isinstance(op, dict) and op.get("kind") == "usage" and isinstance(op.get("key_id"), str):
                    keys.add(op["key_id"])
        return keys

    def ack(self, seqs: list[int]) -> None:
        """Record replayed ops at once (fsynced): a crash during replay does not replay them again."""
        segs = self.segments()
        if not segs or not seqs:
            return
        fd = os.open(segs[-1], os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, json.dumps({"a": _ranges(seqs)}, separators=(",", ":")).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def orphans(root: Path, own: Path | None = None) -> Iterator[Orphan]:
    """Journals under `root` whose process is gone (their flock is free), oldest first; each comes locked."""
    if not root.is_dir():
        return
    dirs = sorted((d for d in root.iterdir() if d.is_dir() and d != own), key=lambda d: d.stat().st_mtime)
    for d in dirs:
        try:
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # a live sidecar's journal
            os.close(fd)
            continue
        yield Orphan(d, fd)
