"""Write-ahead journal of store ops: a crash (even kill -9) or an outage loses no metered dollar.

Every op the writer queues for MongoDB is first appended here, into the OS's page cache at once, so a
killed process loses nothing; `fsync` runs at most every `fsync_interval_s` against power loss. When
MongoDB acknowledges a batch, an ack record is appended and fully acknowledged segments are deleted,
oldest first. Layout: `<root>/<owner>/seg-<n>.jsonl`, one owner directory per process, held by an
`flock` on `<owner>/lock`; the kernel drops that lock when the process dies, however it dies, so the
next start (of any sidecar sharing the data directory) knows which journals are orphaned and replays them.

Why a shared memory map and not `write()`: the append runs on the event loop, inside the `response`
hook, before the answer goes out. A `write()` is a system call that releases the GIL (any busy thread
then holds the loop up to the 5 ms switch interval) and, on ext4, waits while the fsync thread is
flushing the same file (measured: up to 60 ms, about once per fsync). A store into a `MAP_SHARED`
mapping is a memory copy into the same page cache (it survives kill -9 exactly like a written page,
and `fsync` flushes it), with no system call and no GIL hand-off. Segments are preallocated
(`posix_fallocate`: a full disk fails at creation, never as a fault on a store) by the fsync thread
ahead of time, and trimmed to their used length when they are retired. Where a file cannot be mapped
or preallocated, the journal falls back to one `write()` per op.

Lines: `{"s": seq, "op": {...}}` for an op, `{"a": [[lo, hi], ...]}` for acknowledged seq ranges; the
unused tail of a preallocated segment is NUL bytes, skipped on reading. Segments are deleted only as a
prefix, and an ack is always written to the same or a later segment than its ops, so an op never
outlives its ack record (a replay never applies an acknowledged op).
"""
from __future__ import annotations

import bisect
import fcntl
import json
import logging
from math import isfinite as _isfinite
import mmap
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

SEGMENT_OPS = 4096  # ops per segment file; a segment goes once all of them are acknowledged
SEGMENT_BYTES = 2 << 20  # preallocated size of a mapped segment (4096 ops take about 1 MB)
ACK_ROOM = 16 << 10  # kept free at a segment's end for ack records (a batch's ranges take far less)
WARN_EVERY_S = 60.0

_encode = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode

try:
    from orjson import OPT_APPEND_NEWLINE as _NL
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - a declared dependency; the standard encoder writes the same records
    _dumps = None  # type: ignore[assignment]
    _NL = 0


def encode_op(op: dict[str, Any]) -> bytes:
    """The op as compact JSON; a metered response (the op on the request path) by `_usage_line`, which
    json.loads reads back as the general encoder's output."""
    if len(op) == 7 and op.get("kind") == "usage":
        line = _usage_line(0, op)
        if line is not None:
            return line[len(_NO_SEQ):-2]
    return _encode(op).encode()


_NO_SEQ = b'{"s":0,"op":'


def _usage_line(seq: int, op: dict[str, Any]) -> bytes | None:
    """A usage op's whole journal line, `{"s":seq,"op":{...}}` + newline (the op's fields in `writer.usage_op`'s
    order), by orjson: a third of the template's instructions (its floats above all). None when the op is not
    exactly such an op with real numbers (the general encoder writes it: orjson would write NaN as null).

    The same record as the general encoder's, read back by `json.loads` (any version's replay) to equal
    values: floats in their shortest exact form (`1e-7` for `1e-07`), `at` to the microsecond, non-ASCII
    text as UTF-8 rather than `\\u` escapes."""
    if len(op) != 7 or _dumps is None:
        return None
    try:
        kind, op_id, key_id, cost, tokens, at, floor = (op["kind"], op["op_id"], op["key_id"], op["cost"], op["tokens"],
                                                        op["at"], op["key_spend_floor"])
    except KeyError:
        return None
    if (kind == "usage" and type(op_id) is str and type(key_id) is str and type(cost) is float and type(tokens) is int
            and type(at) is float and _isfinite(cost + at)
            and (floor is None or (type(floor) is float and _isfinite(floor)))):
        return _fast_line(seq, op)
    return None


def _fast_line(seq: int, op: dict[str, Any]) -> bytes | None:
    """The op's whole journal line by orjson (its numbers known to be real: orjson writes NaN as null);
    None when orjson cannot write it (a lone surrogate in an id, a count past 64 bits)."""
    try:
        return _dumps({"s": seq, "op": op}, option=_NL)  # type: ignore[no-any-return]
    except TypeError:
        return None


def _ranges(seqs: list[int]) -> list[list[int]]:
    """[1,2,3,7,8] -> [[1,3],[7,8]]: ack records stay small for contiguous batches."""
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def read_lines(path: Path) -> Iterator[bytes]:
    """A segment's records; the NUL tail of a preallocated file (and NULs after a torn line) skipped."""
    data = path.read_bytes()
    if b"\x00" in data:
        data = data.replace(b"\x00", b"\n")
    for raw in data.split(b"\n"):
        if raw:
            yield raw


class _Segment:
    """One segment file: mapped (`mem` set: appends are memory stores) or written op by op."""

    __slots__ = ("index", "path", "fd", "mem", "capacity", "pos", "first_seq", "ops")

    def __init__(self, index: int, path: Path, fd: int, mem: mmap.mmap | None, capacity: int) -> None:
        self.index, self.path, self.fd, self.mem, self.capacity = index, path, fd, mem, capacity
        self.pos = 0
        self.first_seq = 0
        self.ops = 0

    def put(self, data: bytes) -> None:
        if self.mem is not None:
            end = self.pos + len(data)
            self.mem[self.pos:end] = data
            self.pos = end
        else:
            os.write(self.fd, data)
            self.pos += len(data)

    def fits(self, n: int) -> bool:
        return self.mem is None or self.pos + n <= self.capacity

    def retire(self) -> None:
        """fsync, unmap, trim the preallocated tail, close (never on the request path)."""
        try:
            os.fsync(self.fd)
        except OSError:
            pass
        if self.mem is not None:
            self.mem.close()
            self.mem = None
            try:
                os.ftruncate(self.fd, self.pos)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1


def _open_segment(path: Path, index: int, size: int, mapped: bool) -> _Segment:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    if mapped:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)  # blocks reserved now: a store can never fault on a full disk
            else:  # pragma: no cover - platforms without it
                raise OSError("no posix_fallocate")
            return _Segment(index, path, fd, mmap.mmap(fd, size), size)
        except (OSError, ValueError) as e:
            log.info("💾 [OpenHands/Store] journal segment not mapped (%s): one write per update", e)
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
    return _Segment(index, path, fd, None, 0)


class Journal:
    """This process's journal. `append` is cheap (one JSON encode, one memory copy) and thread-safe."""

    def __init__(self, root: Path, *, fsync_interval_s: float = 0.1, max_bytes: int = 256 << 20,
                 segment_ops: int = SEGMENT_OPS, segment_bytes: int = SEGMENT_BYTES, mapped: bool = True) -> None:
        self.root = root
        self.fsync_interval_s = max(0.0, float(fsync_interval_s))
        self.max_bytes = int(max_bytes)
        self.segment_ops = segment_ops
        self.segment_bytes = max(int(segment_bytes), 2 * ACK_ROOM)
        self.mapped = mapped
        self._lock = threading.Lock()
        self._seq = 0
        self._cur: _Segment | None = None
        self._closed = False
        self._spare: _Segment | None = None
        self._next_index = 0
        self._segments: dict[int, int] = {}  # segment index -> unacknowledged ops in it
        self._sizes: dict[int, int] = {}
        self._paths: dict[int, Path] = {}
        self._firsts: list[int] = []  # first seq of each segment, ascending (parallel to _first_index)
        self._first_index: list[int] = []
        self._bytes = 0
        self._dirty = False
        self._retired: list[_Segment] = []
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
    def append(self, op: dict[str, Any], usage: bool = False) -> int | None:
        """Journal one op; returns its seq, or None when the journal is full (the op is then memory-only).

        `usage`: the op is a metered response's whose numbers are all finite (`writer.submit_usage` checked
        them; one per answer): its line is written by orjson at once, the record `encode_op` gives, without
        checking the op's fields again (orjson writes NaN as null: hence the caller's check)."""
        body = None if usage and _dumps is not None else encode_op(op)
        lock = self._lock
        lock.acquire()  # (`with` costs twice the instructions of the two calls: this runs per answer)
        try:
            if self._closed:
                return None
            seq = self._seq + 1
            line = _fast_line(seq, op) if body is None else None
            if line is None:
                line = b'{"s":%d,"op":%b}\n' % (seq, encode_op(op) if body is None else body)
            n = len(line)
            if self._bytes + n > self.max_bytes:
                self._refuse()
                return None
            if self._full_since is not None:
                log.warning("💾 [OpenHands/Store] journal has room again after %.0fs; %d update(s) in that time "
                            "were not crash-safe", time.time() - self._full_since, self.unjournaled)
                self._full_since = None
            seg = self._cur
            if seg is None or seg.ops >= self.segment_ops or (
                    seg.mem is not None and seg.pos + n + ACK_ROOM > seg.capacity):  # `not seg.fits(...)`, inlined
                seg = self._roll(n + ACK_ROOM)
            if not seg.ops:
                seg.first_seq = seq
                self._firsts.append(seq)
                self._first_index.append(seg.index)
            mem = seg.mem
            if mem is not None:  # `put`, inlined: this is the one store an answer waits for
                end = seg.pos + n
                mem[seg.pos:end] = line
                seg.pos = end
            else:
                seg.put(line)
            seg.ops += 1
            self._seq = seq
            self._segments[seg.index] += 1
            self._sizes[seg.index] += n
            self._bytes += n
            self._dirty = True
            if self.fsync_interval_s == 0:
                os.fsync(seg.fd)
                self._dirty = False
            return seq
        finally:
            lock.release()

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

    def _new_segment(self, need: int) -> _Segment:
        index = self._next_index
        self._next_index += 1
        path = self.dir / f"seg-{index:08d}.jsonl"
        return _open_segment(path, index, max(self.segment_bytes, need), self.mapped)

    def _roll(self, need: int) -> _Segment:
        """Start the next segment (the fsync thread's spare if it fits; caller holds the lock)."""
        old = self._cur
        if old is not None:
            if self.fsync_interval_s == 0:
                old.retire()  # every write was fsynced already
            else:
                self._retired.append(old)  # fsynced, trimmed and closed by the syncer, off the request path
        spare, self._spare = self._spare, None
        if spare is not None and spare.fits(need) and (old is None or spare.index > old.index):
            seg = spare  # (an older index would break "acks in the same or a later segment than their ops")
        else:
            if spare is not None:  # too small for this op, or overtaken: drop it, its index stays unused
                spare.retire()
                spare.path.unlink(missing_ok=True)
            seg = self._new_segment(need)
        self._cur = seg
        self._segments.setdefault(seg.index, 0)
        self._sizes.setdefault(seg.index, 0)
        self._paths[seg.index] = seg.path
        return seg

    # -- writer thread ------------------------------------------------------------------------
    def ack(self, seqs: list[int], *, discarded: bool = False) -> None:
        """MongoDB has these ops (or they were deliberately dropped): record it, delete finished segments."""
        seqs = [s for s in seqs if s]
        if not seqs:
            return
        ranges = _ranges(seqs)  # prepared outside the lock: appends wait for nothing but the bookkeeping
        line = json.dumps({"a": ranges}, separators=(",", ":")).encode() + b"\n"
        with self._lock:
            seg = self._cur
            if seg is None or self._closed:
                return
            if not seg.fits(len(line)):
                seg = self._roll(len(line) + ACK_ROOM)
            seg.put(line)
            self._sizes[seg.index] += len(line)
            self._bytes += len(line)
            self._dirty = True
            self._count_acked(ranges)
            gone = self._drop_finished_prefix()
        for path in gone:  # the file system calls outside the lock: appends never wait for them
            path.unlink(missing_ok=True)

    def _count_acked(self, ranges: list[list[int]]) -> None:
        """Each segment's unacknowledged count drops by the acknowledged seqs in it (caller holds the
        lock): one step per range and segment, not per op. Seqs of segments already gone are ignored."""
        firsts, n = self._firsts, len(self._firsts)
        if not n:
            return
        for lo, hi in ranges:
            lo = max(lo, firsts[0])
            i = bisect.bisect_right(firsts, lo) - 1
            while lo <= hi and i < n:
                top = min(hi, firsts[i + 1] - 1 if i + 1 < n else self._seq)
                idx = self._first_index[i]
                if top >= lo and idx in self._segments:
                    self._segments[idx] -= top - lo + 1
                lo, i = top + 1, i + 1

    def _drop_finished_prefix(self) -> list[Path]:
        gone: list[Path] = []
        cur = self._cur.index if self._cur is not None else -1
        for idx in sorted(self._segments):
            if idx >= cur or self._segments[idx] > 0:
                break
            del self._segments[idx]
            self._bytes -= self._sizes.pop(idx, 0)
            gone.append(self._paths.pop(idx))
        if gone:  # their first-seq entries go too (ack lookups only ever need live segments)
            first_live = min(self._segments, default=cur)
            keep = bisect.bisect_left(self._first_index, first_live)
            del self._firsts[:keep], self._first_index[:keep]
        return gone

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
            try:
                self.sync()
                self._prepare_spare()
            except OSError as e:
                log.warning("💾 [OpenHands/Store] journal fsync failed: %s", e)

    def _prepare_spare(self) -> None:
        """The next segment, preallocated and mapped off the request path."""
        with self._lock:
            if self._spare is not None or self._closed or not self.mapped:
                return
            index = self._next_index
            self._next_index += 1
        spare = _open_segment(self.dir / f"seg-{index:08d}.jsonl", index, self.segment_bytes, True)
        with self._lock:
            if self._spare is None and not self._closed and (self._cur is None or index > self._cur.index):
                self._spare = spare
                return
        spare.retire()
        spare.path.unlink(missing_ok=True)

    def sync(self) -> None:
        """fsync what was written (and retire finished segments); never holds the append lock while syncing."""
        with self._lock:
            seg, dirty = self._cur, self._dirty
            retired, self._retired = self._retired, []
            self._dirty = False
            fd = os.dup(seg.fd) if dirty and seg is not None else -1  # a concurrent retire keeps our copy valid
        for r in retired:
            r.retire()
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
            last = [s for s in (self._cur, self._spare) if s is not None]
            self._cur = self._spare = None
            self._closed = True
        for seg in last:
            seg.retire()
        if left == 0:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            for seg in last:
                if seg.pos == 0:
                    seg.path.unlink(missing_ok=True)
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
            for raw in read_lines(seg):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    log.warning("💾 [OpenHands/Store] skipping a torn journal line in %s", seg.name)
                    continue
                if not isinstance(rec, dict):
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
            for raw in read_lines(seg):
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                op = rec.get("op") if isinstance(rec, dict) else None
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
            os.write(fd, b"\n" + json.dumps({"a": _ranges(seqs)}, separators=(",", ":")).encode() + b"\n")
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
