"""Layer 3: snapshot files — full and incremental — and restoring from a chain.

A full snapshot holds every non-zero page; each incremental one the pages
dirtied since the snapshot before it (its parent), plus the complete vCPU,
VM and device state.  Restore = the full snapshot's pages, then each
increment's, then the last one's machine state.

Files are written atomically: to a temporary file in the same folder,
fsync'ed, renamed over the target, and the folder fsync'ed, so an existing
snapshot is never left half-written.  Reading checks every file completely
(sections.decode + vmstate.parse + the chain) before building anything.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import time
from dataclasses import dataclass

from kvmcolo import dirty_log, sections, vmstate
from kvmcolo.buffers import consume
from kvmcolo.errors import UserError
from kvmcolo.files import open_regular

log = logging.getLogger(__name__)


@dataclass
class SnapshotResult:
    path: str
    kind: str
    id: str
    pages: int
    bytes: int
    pause_ms: float
    write_ms: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def write_atomically(path: str, parts) -> int:
    """Write `parts` to `path` through a temporary file and a rename.  Only a
    regular file (or nothing) is ever replaced: a device node, a folder or a
    FIFO given by mistake is refused before anything is written."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"cannot write snapshot {path!r}: {e.strerror}")
    if st is not None and not stat.S_ISREG(st.st_mode):
        what = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise UserError(f"cannot write snapshot {path!r}: it is {what}; give a file path")
    folder = os.path.dirname(os.path.abspath(path)) or "."
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise UserError(f"cannot write snapshot {path!r}: {e.strerror}")
    try:
        written = 0
        batch = []
        for p in parts:  # writev in batches (IOV_MAX), handling short writes
            batch.append(memoryview(p).cast("B"))
            if len(batch) == 512:
                written += _writev_all(fd, batch)
                batch = []
        written += _writev_all(fd, batch)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    try:
        os.rename(tmp, path)
    except OSError as e:
        os.unlink(tmp)  # never leave a snapshot-sized temporary file behind
        raise UserError(f"cannot write snapshot {path!r}: {e.strerror}")
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return written


def _writev_all(fd: int, views: list[memoryview]) -> int:
    total = 0
    while views:
        n = os.writev(fd, views)
        total += n
        consume(views, n)
    return total


class Snapshotter:
    """Takes snapshots of one running machine."""

    def __init__(self, machine):
        self.machine = machine
        self._host: vmstate.HostCaps | None = None
        self.last_id: str | None = None

    def host_caps(self) -> vmstate.HostCaps:
        if self._host is None:
            self._host = vmstate.HostCaps.of(self.machine)
        return self._host

    def take(self, path: str, incremental: bool = False) -> SnapshotResult:
        m = self.machine
        if incremental and self.last_id is None:
            raise UserError("no earlier snapshot of this VM to build an incremental one on; take a full one first")
        t0 = time.perf_counter()
        with m.held("snapshot"):
            kind = vmstate.KIND_INCREMENTAL if incremental else vmstate.KIND_FULL
            cap = vmstate.capture(m, dirty_log.of(m).reader("snapshot"), kind, self.last_id if incremental else None, self.host_caps())
        t1 = time.perf_counter()
        size = write_atomically(path, sections.encode(cap.sections))
        t2 = time.perf_counter()
        self.last_id = cap.meta["id"]
        log.info("snapshot %s: %s, %d pages, %d bytes, guest paused %.1f ms", path, kind, cap.dirty_pages, size,
                 (t1 - t0) * 1e3)  # fmt: skip
        return SnapshotResult(path, kind, cap.meta["id"], cap.dirty_pages, size, (t1 - t0) * 1e3, (t2 - t1) * 1e3)


def read_chain(paths: list[str]) -> list[vmstate.Snapshot]:
    """Read and check snapshot files; UserError (nothing built) on any problem."""
    snaps = []
    for path in paths:
        try:
            with open_regular(path, "snapshot") as f:
                size = os.fstat(f.fileno()).st_size
                data = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) if size else b""
        except FileNotFoundError:
            raise UserError(f"snapshot {path!r} does not exist")
        except OSError as e:
            raise UserError(f"cannot read snapshot {path!r}: {e.strerror}")
        try:
            snaps.append(vmstate.parse(data))
        except sections.StateFormatError as e:
            raise UserError(f"snapshot {path!r} is unusable: {e}")
    try:
        vmstate.check_chain(snaps)
    except vmstate.IncompatibleState as e:
        raise UserError(f"cannot restore: {e}")
    return snaps


def restore_machine(snaps: list[vmstate.Snapshot], **config_overrides):
    """A new machine holding the chain's state, ready to start."""
    from kvmcolo.machine import Machine

    shape = snaps[-1].meta["machine"]
    machine = Machine(Machine.config_from_shape(shape, **config_overrides), boot_kernel=False)
    try:
        host = vmstate.HostCaps.of(machine)
        try:
            host.check_can_hold(snaps[-1].meta["host"])
        except vmstate.IncompatibleState as e:
            raise UserError(f"cannot restore on this host: {e}")
        for disk, img in zip(shape["disks"], machine.disk_images):
            if img.size != disk["size"]:
                raise UserError(f"disk {disk['path']!r} is {img.size} bytes now, {disk['size']} when snapshotted")
        for s in snaps:
            vmstate.apply_ram(machine.vm.memory, s)
        vmstate.apply(machine, snaps[-1])
    except BaseException:
        machine.close()
        raise
    return machine
