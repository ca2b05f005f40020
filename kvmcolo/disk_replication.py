"""Layer 4: the primary's disk writes on the secondary — kept pending until
the checkpoint that covers them, then applied to the base image crash-safely.

PendingWrites keeps forwarded writes in arrival order: in memory up to a
bound, beyond it in a scratch file.  At a checkpoint, apply_writes() first
writes them all to a journal next to the base image and fsyncs it, marks it
complete (a trailer with a CRC of everything before it) and fsyncs again,
then writes them into the base, fsyncs the base, and removes the journal.
A secondary that dies in the middle finds the journal at its next start:
recover() replays a complete journal (the writes are idempotent) or drops a
torn one (the base was not touched yet), so the base is never half-applied.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import tempfile
import zlib

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".kvmcolo-journal"
_JOURNAL_HEAD = struct.Struct("<8sQ")  # magic, number of entries
_ENTRY = struct.Struct("<QI")  # offset, length
_TRAILER = struct.Struct("<8sI")  # magic, crc32 of everything before the trailer
JOURNAL_MAGIC = b"KCJRNL01"
TRAILER_MAGIC = b"KCJDONE1"
DEFAULT_MEMORY_LIMIT = 64 << 20
HASH_CHUNK = 1 << 20


class PendingWrites:
    """Forwarded writes of one disk, in order, not yet applied.

    Each write carries the epoch it was made in on the primary (how many
    checkpoints it had captured by then), so a checkpoint takes exactly the
    writes its capture saw: a write the resumed primary made after the
    capture can overtake the checkpoint's own frames on the wire, but not
    its epoch."""

    def __init__(self, scratch_dir: str | None = None, memory_limit: int = DEFAULT_MEMORY_LIMIT):
        self.memory_limit = memory_limit
        self._scratch_dir = scratch_dir
        # (epoch, offset, data or None if spilled, spill offset, length), epochs non-decreasing
        self._entries: list[tuple[int, int, bytes | None, int, int]] = []
        self._in_memory = 0
        self._spill = None
        self.bytes = 0

    def add(self, offset: int, data: bytes, epoch: int = 0) -> None:
        if self._entries and epoch < self._entries[-1][0]:
            raise ValueError(f"write of epoch {epoch} after one of epoch {self._entries[-1][0]}")
        if self._in_memory + len(data) <= self.memory_limit:
            self._entries.append((epoch, offset, data, 0, len(data)))
            self._in_memory += len(data)
        else:
            if self._spill is None:
                self._spill = tempfile.TemporaryFile(dir=self._scratch_dir, buffering=0)
                self._spill_end = 0
            os.pwrite(self._spill.fileno(), data, self._spill_end)
            self._entries.append((epoch, offset, None, self._spill_end, len(data)))
            self._spill_end += len(data)
        self.bytes += len(data)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self):
        for _, offset, data, at, length in self._entries:
            if data is None:
                data = os.pread(self._spill.fileno(), length, at)
            yield offset, data

    def before(self, epoch: int) -> list[tuple[int, bytes]]:
        """The writes made before `epoch`, in order (the front of the list)."""
        n = self._count_before(epoch)
        return list(self)[:n] if n else []

    def drop_before(self, epoch: int) -> None:
        n = self._count_before(epoch)
        if n == len(self._entries):
            self.clear()
            return
        for e in self._entries[:n]:
            self.bytes -= e[4]
            if e[2] is not None:
                self._in_memory -= e[4]
        del self._entries[:n]

    def _count_before(self, epoch: int) -> int:
        n = 0
        while n < len(self._entries) and self._entries[n][0] < epoch:
            n += 1
        return n

    def clear(self) -> None:
        self._entries = []
        self._in_memory = 0
        self.bytes = 0
        if self._spill is not None:
            self._spill.close()
            self._spill = None


def journal_path(base_path: str) -> str:
    return base_path + JOURNAL_SUFFIX


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply_writes(base_path: str, writes, crash_hook=None) -> int:
    """Apply `writes` (a sequence of (offset, data)) to the base image through
    the journal; returns bytes applied."""
    if not len(writes):
        return 0
    jpath = journal_path(base_path)
    crc = 0
    with open(jpath, "wb") as j:
        head = _JOURNAL_HEAD.pack(JOURNAL_MAGIC, len(writes))
        j.write(head)
        crc = zlib.crc32(head, crc)
        for offset, data in writes:
            entry = _ENTRY.pack(offset, len(data))
            j.write(entry)
            j.write(data)
            crc = zlib.crc32(data, zlib.crc32(entry, crc))
        j.flush()
        os.fsync(j.fileno())
        j.write(_TRAILER.pack(TRAILER_MAGIC, crc))  # complete only once everything before it is durable
        j.flush()
        os.fsync(j.fileno())
    _fsync_dir(jpath)
    if crash_hook:
        crash_hook()
    applied = _apply_journal(base_path, jpath)
    return applied


def _apply_journal(base_path: str, jpath: str) -> int:
    entries = read_journal(jpath)
    if entries is None:
        raise ValueError(f"journal {jpath} is incomplete")
    fd = os.open(base_path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        applied = 0
        for offset, data in entries:
            os.pwrite(fd, data, offset)
            applied += len(data)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.unlink(jpath)
    _fsync_dir(jpath)
    return applied


def read_journal(jpath: str) -> list[tuple[int, bytes]] | None:
    """The journal's writes, or None if it is torn (no valid trailer)."""
    with open(jpath, "rb") as f:
        raw = f.read()
    if len(raw) < _JOURNAL_HEAD.size + _TRAILER.size:
        return None
    magic, crc = _TRAILER.unpack_from(raw, len(raw) - _TRAILER.size)
    body = raw[: len(raw) - _TRAILER.size]
    if magic != TRAILER_MAGIC or zlib.crc32(body) != crc:
        return None
    jmagic, count = _JOURNAL_HEAD.unpack_from(body)
    if jmagic != JOURNAL_MAGIC:
        return None
    out, at = [], _JOURNAL_HEAD.size
    for _ in range(count):
        offset, length = _ENTRY.unpack_from(body, at)
        at += _ENTRY.size
        out.append((offset, body[at : at + length]))
        at += length
    return out


def recover(base_path: str) -> str | None:
    """At start-up: finish (complete journal) or roll back (torn journal) an
    apply that a previous run did not finish.  Returns what was done."""
    jpath = journal_path(base_path)
    if not os.path.exists(jpath):
        return None
    if read_journal(jpath) is None:
        os.unlink(jpath)
        _fsync_dir(jpath)
        log.warning("%s: dropped an incomplete disk journal (the base was not touched)", base_path)
        return "rolled back"
    n = _apply_journal(base_path, jpath)
    log.warning("%s: replayed an unfinished disk journal (%d bytes)", base_path, n)
    return "replayed"


def chunk_hashes(path: str, chunk: int = HASH_CHUNK) -> list[str]:
    """Hashes of each `chunk` bytes of a disk image (for the initial sync)."""
    out = []
    with open(path, "rb") as f:
        while block := f.read(chunk):
            out.append(hashlib.blake2b(block, digest_size=16).hexdigest())
    return out


def file_hash(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()
