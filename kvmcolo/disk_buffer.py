"""Layer 4: the secondary's disk overlay — a FUSE file that shows the base
image with the SVM's own writes on top, without ever writing the base.

The secondary VM must not change its real disk: its writes are only
speculative until the next checkpoint, which throws them away (the primary's
writes are applied to the base instead, see disk_replication.py).  So the
SVM's virtio-blk opens a file inside a private FUSE mount, served by a daemon
in a child process:

  - reads return the overlay's blocks where the SVM wrote, the base elsewhere;
  - writes go to the overlay (a scratch file next to the base, unlinked),
    never to the base; a partial block is first filled from the base;
  - drop() (each checkpoint, SVM paused) forgets every overlay block;
  - commit() (failover) copies the overlay into the base, fsyncs it, and
    from then on writes go straight to the base (passthrough).

OverlayCore is the bookkeeping (block map, read/write/commit plans) with no
I/O; OverlayFS is the thin fusepy driver over it, run by `python -m
kvmcolo.disk_buffer serve` (a child process: libfuse wants its own signal
handling and main thread, and the VMM must not fork after starting threads);
OverlayMount is the VMM's handle on that child, talking newline-delimited
JSON over a socketpair.

The file is opened with direct_io and zero attribute/entry timeouts: the
base is rewritten behind the mount at every checkpoint, so the kernel must
never answer a read from its page cache or keep a stale size.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

from kvmcolo.errors import UserError
from kvmcolo.processes import pid_alive

log = logging.getLogger(__name__)

DEFAULT_ROOT = "/run/kvmcolo/overlay"
SECTOR = 512
BASE, OVERLAY = "base", "overlay"
READY_TIMEOUT = 15.0
CALL_TIMEOUT = 10.0
COMMIT_TIMEOUT = 600.0  # copies the whole overlay into the base and fsyncs it
COPY_CHUNK = 1 << 20
SCRATCH_KEEP = 64 << 20  # scratch space a drop() keeps for the next checkpoint interval
MAX_REQUEST = 128 << 10  # libfuse 2 cannot negotiate more than 32 pages per request
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------- the core


@dataclass
class Extent:
    """`length` bytes at `offset` of the base or of the overlay's scratch file;
    for writes, `data_offset` is where they start in the caller's buffer."""

    source: str
    offset: int
    length: int
    data_offset: int = 0


@dataclass
class WritePlan:
    fills: list[tuple[int, int, int]] = field(default_factory=list)  # (base offset, overlay offset, length)
    extents: list[Extent] = field(default_factory=list)
    new_slots: dict[int, int] = field(default_factory=dict)  # block -> slot, recorded by apply_write()
    generation: int = 0


def _append(extents: list[Extent], e: Extent) -> None:
    """Append, merging with the previous extent when both are contiguous."""
    if extents:
        p = extents[-1]
        if p.source == e.source and p.offset + p.length == e.offset and p.data_offset + p.length == e.data_offset:
            p.length += e.length
            return
    extents.append(e)


class OverlayCore:
    """Which bytes of the disk live in the overlay, and where.

    The disk is cut in blocks of `block_size` (the last may be short).  A block
    the SVM wrote owns a slot in the scratch file (slot s at s * block_size),
    holding the whole block; slots are handed out in order, so a long write
    lands contiguously and reads back in one pread.  No I/O happens here: the
    plans say what to read or write, the driver does it, then apply_write()
    records the new blocks (so a failed fill leaves the map unchanged)."""

    def __init__(self, size: int, block_size: int = 4096):
        if block_size <= 0 or block_size % SECTOR:
            raise ValueError(f"block size must be a positive multiple of {SECTOR}, got {block_size}")
        self.size = size
        self.block_size = block_size
        self.passthrough = False
        self.generation = 0  # bumped by drop() and commit: a read planned before must be planned again
        self._slots: dict[int, int] = {}
        self._next_slot = 0

    @property
    def blocks(self) -> int:
        return len(self._slots)

    @property
    def scratch_size(self) -> int:
        return self._next_slot * self.block_size

    def _block_len(self, block: int) -> int:
        return min(self.block_size, self.size - block * self.block_size)

    def plan_read(self, offset: int, length: int) -> list[Extent]:
        """The extents that make up [offset, offset+length), clipped at the end
        of the disk; their data_offset is where each lands in the result."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        end = min(offset + length, self.size)
        if offset >= end:
            return []
        if self.passthrough or not self._slots:
            return [Extent(BASE, offset, end - offset, 0)]
        bs, slots = self.block_size, self._slots
        out: list[Extent] = []
        block, last = offset // bs, (end - 1) // bs
        while block <= last:  # one extent per run of base blocks or of consecutive slots
            slot = slots.get(block)
            after = block + 1
            if slot is None:
                while after <= last and after not in slots:
                    after += 1
            else:
                while after <= last and slots.get(after) == slot + after - block:
                    after += 1
            start, stop = max(offset, block * bs), min(end, after * bs)
            if slot is None:
                out.append(Extent(BASE, start, stop - start, start - offset))
            else:
                out.append(Extent(OVERLAY, slot * bs + start - block * bs, stop - start, start - offset))
            block = after
        return out

    def plan_write(self, offset: int, length: int) -> WritePlan:
        """Where [offset, offset+length) goes.  A write past the end of the disk
        is refused whole (EFBIG): the disk's size is the base's."""
        if offset < 0 or length < 0:
            raise OSError(errno.EINVAL, "negative offset or length")
        if offset + length > self.size:
            raise OSError(errno.EFBIG, f"write [{offset}, {offset + length}) beyond the end of the disk ({self.size})")
        plan = WritePlan(generation=self.generation)
        if length == 0:
            return plan
        if self.passthrough:
            plan.extents.append(Extent(BASE, offset, length, 0))
            return plan
        bs, slots = self.block_size, self._slots
        end = offset + length
        first, last = offset // bs, (end - 1) // bs
        next_slot = self._next_slot
        block = first
        while block <= last:  # runs of new blocks (given consecutive slots) or of consecutive slots
            slot = slots.get(block)
            after = block + 1
            if slot is None:
                while after <= last and after not in slots:
                    after += 1
                slot = next_slot
                plan.new_slots.update(zip(range(block, after), range(slot, slot + after - block)))
                next_slot += after - block
                for edge in {block, after - 1} & {first, last}:  # only the ends of the write can be partial
                    covered = min(end, (edge + 1) * bs) - max(offset, edge * bs)
                    if covered < self._block_len(edge):  # the rest of the block must come from the base
                        plan.fills.append((edge * bs, (slot + edge - block) * bs, self._block_len(edge)))
            else:
                while after <= last and slots.get(after) == slot + after - block:
                    after += 1
            start, stop = max(offset, block * bs), min(end, after * bs)
            _append(plan.extents, Extent(OVERLAY, slot * bs + start - block * bs, stop - start, start - offset))
            block = after
        return plan

    def apply_write(self, plan: WritePlan) -> None:
        """Record the blocks a write planned, once its I/O succeeded."""
        if plan.generation != self.generation:
            raise RuntimeError("write plan outlived a drop or commit")
        self._slots.update(plan.new_slots)
        self._next_slot += len(plan.new_slots)

    def drop(self) -> None:
        """Forget every overlay block: reads show the base again."""
        self._slots.clear()
        self._next_slot = 0
        self.generation += 1

    def plan_commit(self) -> list[tuple[int, int, int]]:
        """(overlay offset, base offset, length) runs that copy every overlay
        block into the base, in base order, merged where contiguous."""
        bs = self.block_size
        runs: list[list[int]] = []
        for block in sorted(self._slots):
            src, dst, n = self._slots[block] * bs, block * bs, self._block_len(block)
            if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
                runs[-1][2] += n
            else:
                runs.append([src, dst, n])
        return [tuple(r) for r in runs]

    def finish_commit(self) -> None:
        """The commit plan was copied and the base synced: empty the overlay and
        pass every later write straight to the base."""
        self.drop()
        self.passthrough = True

    def buffer(self) -> None:
        """Keep writes in the overlay again (a side that runs through its
        overlay becomes a secondary once more, at a switchover)."""
        self.drop()
        self.passthrough = False


# ---------------------------------------------------------------- the daemon


def _pread_exact(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    while len(data) < length:  # pread may return less on a regular file only at EOF or on a signal
        more = os.pread(fd, length - len(data), offset + len(data))
        if not more:
            raise OSError(errno.EIO, f"short read at {offset + len(data)}")
        data += more
    return data


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(errno.EIO, f"short read at {offset}")
        view, offset = view[n:], offset + n


def _pwrite_all(fd: int, data, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _open_scratch(directory: str) -> int:
    """An unlinked file next to the base (same filesystem, gone with us)."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError:
        fd, path = tempfile.mkstemp(prefix=".kvmcolo-overlay-", dir=directory)
        os.unlink(path)
        return fd


# libfuse's worker threads are not Python threads: every ctypes callback in
# one creates a Python thread state and throws it away on return, which was
# half the cost of a 4 KiB read.  Taking one extra PyGILState reference per
# worker keeps its state alive (the callback still releases the GIL).
_PINNED: set[int] = set()


def _make_operations_class():
    """fusepy is imported only in the daemon (it loads libfuse at import)."""
    import fuse

    class OverlayFS(fuse.Operations):
        use_ns = True  # utimens in nanoseconds (and silences fusepy's warning)

        def __call__(self, op, *args):  # every FUSE operation comes through here
            ident = threading.get_ident()
            if ident not in _PINNED:
                _PINNED.add(ident)
                ctypes.pythonapi.PyGILState_Ensure()
            return getattr(self, op)(*args)

        def __init__(self, base_path: str, block_size: int, control: socket.socket | None = None):
            self._name = os.path.basename(base_path)
            self._path = "/" + self._name
            self._base_fd = os.open(base_path, os.O_RDWR | os.O_CLOEXEC)
            st = os.fstat(self._base_fd)
            self._core = OverlayCore(os.lseek(self._base_fd, 0, os.SEEK_END), block_size)
            self._scratch_fd = _open_scratch(os.path.dirname(os.path.abspath(base_path)))
            self._mode = stat.S_IMODE(st.st_mode) & 0o666
            self._mtime_ns = st.st_mtime_ns
            self._mutex = threading.Lock()
            self._control = control
            self._counters = dict(reads=0, writes=0, read_bytes=0, written_bytes=0, drops=0, commits=0, fills=0)

        # --- control requests (from the control thread)

        def drop(self) -> dict:
            with self._mutex:
                self._core.drop()
                # Slots start again at 0 and overwrite the old ones: rewriting
                # allocated blocks is cheaper than growing the file again, so
                # only the space beyond SCRATCH_KEEP goes back.
                if os.fstat(self._scratch_fd).st_size > SCRATCH_KEEP:
                    os.ftruncate(self._scratch_fd, SCRATCH_KEEP)
                self._counters["drops"] += 1
            return {}

        def commit(self) -> dict:
            with self._mutex:
                copied = 0
                for src, dst, n in self._core.plan_commit():
                    for at in range(0, n, COPY_CHUNK):
                        k = min(COPY_CHUNK, n - at)
                        _pwrite_all(self._base_fd, _pread_exact(self._scratch_fd, k, src + at), dst + at)
                    copied += n
                os.fsync(self._base_fd)
                self._core.finish_commit()
                os.ftruncate(self._scratch_fd, 0)
                self._counters["commits"] += 1
            return {"copied": copied}

        def buffer(self) -> dict:
            with self._mutex:
                self._core.buffer()
            return {}

        def stats(self) -> dict:
            with self._mutex:
                return dict(self._counters, overlay_blocks=self._core.blocks,
                            overlay_bytes=self._core.blocks * self._core.block_size,
                            scratch_bytes=self._core.scratch_size, passthrough=self._core.passthrough,
                            size=self._core.size, block_size=self._core.block_size)  # fmt: skip

        # --- FUSE operations

        def init(self, path):
            if self._control is not None:
                threading.Thread(target=_control_loop, args=(self, self._control), name="overlay-control", daemon=True).start()

        def getattr(self, path, fh=None):
            now = time.time_ns()
            if path == "/":
                return dict(st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_size=0, st_mtime=now, st_ctime=now, st_atime=now)
            if path == self._path:
                return dict(st_mode=stat.S_IFREG | self._mode, st_nlink=1, st_size=self._core.size,
                            st_blocks=(self._core.size + 511) // 512, st_blksize=self._core.block_size,
                            st_mtime=self._mtime_ns, st_ctime=self._mtime_ns, st_atime=self._mtime_ns)  # fmt: skip
            raise fuse.FuseOSError(errno.ENOENT)

        def readdir(self, path, fh):
            if path != "/":
                raise fuse.FuseOSError(errno.ENOTDIR)
            return [".", "..", self._name]

        def open(self, path, fi):
            if path != self._path:
                raise fuse.FuseOSError(errno.ENOENT)
            fi.direct_io = 1  # every read and write reaches us: the base changes behind the kernel's back
            fi.keep_cache = 0
            return 0

        def read(self, path, buf: memoryview, offset: int) -> int:
            while True:
                with self._mutex:
                    generation = self._core.generation
                    extents = self._core.plan_read(offset, len(buf))
                for e in extents:
                    fd = self._base_fd if e.source == BASE else self._scratch_fd
                    _pread_into(fd, buf[e.data_offset : e.data_offset + e.length], e.offset)
                with self._mutex:
                    if self._core.generation == generation:  # no drop/commit moved the blocks meanwhile
                        n = sum(e.length for e in extents)
                        self._counters["reads"] += 1
                        self._counters["read_bytes"] += n
                        return n

        def write(self, path, data: memoryview, offset: int) -> int:
            try:
                with self._mutex:
                    plan = self._core.plan_write(offset, len(data))
                    for base_off, scratch_off, n in plan.fills:
                        _pwrite_all(self._scratch_fd, _pread_exact(self._base_fd, n, base_off), scratch_off)
                    for e in plan.extents:
                        fd = self._base_fd if e.source == BASE else self._scratch_fd
                        _pwrite_all(fd, data[e.data_offset : e.data_offset + e.length], e.offset)
                    self._core.apply_write(plan)
                    self._counters["writes"] += 1
                    self._counters["written_bytes"] += len(data)
                    self._counters["fills"] += len(plan.fills)
            except OSError as e:
                raise fuse.FuseOSError(e.errno or errno.EIO) from None
            return len(data)

        def truncate(self, path, length, fh=None):
            if path == self._path and length == self._core.size:
                return 0  # "set the size it already has" (O_TRUNC-free tools do this) is harmless
            raise fuse.FuseOSError(errno.EPERM)

        def fsync(self, path, datasync, fi):
            if self._core.passthrough:  # before commit, nothing written here is meant to last
                (os.fdatasync if datasync else os.fsync)(self._base_fd)
            return 0

        def flush(self, path, fi):
            return 0

        def release(self, path, fi):
            return 0

        def statfs(self, path):
            bs = self._core.block_size
            return dict(f_bsize=bs, f_frsize=bs, f_blocks=(self._core.size + bs - 1) // bs, f_bfree=0, f_bavail=0,
                        f_files=2, f_ffree=0, f_namemax=255)  # fmt: skip

        def chmod(self, path, mode):
            raise fuse.FuseOSError(errno.EPERM)

        def chown(self, path, uid, gid):
            raise fuse.FuseOSError(errno.EPERM)

        def utimens(self, path, times=None):
            return 0

    class OverlayFUSE(fuse.FUSE):
        """fusepy with read and write done in the kernel's buffer: fusepy's own
        copy the data into a bytes object (and back) on every request."""

        def read(self, path, buf, size, offset, fip):
            view = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            return self.operations("read", self._decode_optional_path(path), memoryview(view).cast("B"), offset)

        def write(self, path, buf, size, offset, fip):
            view = (ctypes.c_char * size).from_address(ctypes.addressof(buf.contents))
            return self.operations("write", self._decode_optional_path(path), memoryview(view).cast("B"), offset)

    return OverlayFUSE, OverlayFS


def _send(sock: socket.socket, message: dict) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def _control_loop(fs, sock: socket.socket) -> None:
    """Serve the VMM's requests.  EOF means the VMM is gone (or closed us):
    leave the FUSE loop, which unmounts."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})  # for the main thread
    try:
        _send(sock, {"ready": True})
        for line in sock.makefile("rb"):
            try:
                request = json.loads(line)
                op = request["op"]
                if op not in ("drop", "commit", "buffer", "stats"):
                    raise ValueError(f"unknown request {op!r}")
                reply = {"return": getattr(fs, op)()}
            except Exception as e:  # noqa: BLE001 -- the VMM gets the error, the daemon goes on
                reply = {"error": f"{type(e).__name__}: {e}"}
            _send(sock, reply)
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)  # libfuse's handler ends the loop, which unmounts


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _umount_detach(path: str) -> bool:
    """Lazily unmount `path` (works on a dead FUSE mount too); False when it
    was not a mount point."""
    if _libc().umount2(os.fsencode(path), MNT_DETACH) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOENT):
        return False
    raise OSError(err, f"umount2({path}): {os.strerror(err)}")


def _mount_points() -> set[str]:
    points = set()
    with open("/proc/self/mountinfo") as f:
        for line in f:
            field_ = line.split()[4]
            points.add(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_))
    return points


def serve(base: str, mount_dir: str, block_size: int, control_fd: int, parent: int, remove_dir: bool) -> int:
    """The daemon: mount, serve until SIGTERM / the VMM's death / EOF on the
    control socket / an unmount, then make sure the mount is gone."""
    # SIGTERM when the VMM dies (even by SIGKILL); then check it did not die
    # before we asked.  NB: the signal follows the *thread* that started us.
    _libc().prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        return 1
    control = socket.socket(fileno=control_fd)
    try:
        OverlayFUSE, OverlayFS = _make_operations_class()
        fs = OverlayFS(base, block_size, control)
    except (OSError, ImportError, EnvironmentError) as e:
        _send(control, {"error": f"{type(e).__name__}: {e}"})
        return 2
    try:
        OverlayFUSE(fs, mount_dir, raw_fi=True, foreground=True, nothreads=False,
                  fsname="kvmcolo-overlay", subtype="kvmcolo", big_writes=True, max_write=MAX_REQUEST,
                  max_read=MAX_REQUEST, attr_timeout=0, entry_timeout=0, negative_timeout=0)  # fmt: skip
    except RuntimeError as e:  # fuse_main failed (libfuse printed why on stderr)
        try:
            _send(control, {"error": f"fuse_main failed ({e}); see the daemon's stderr"})
        except OSError:
            pass
        return 2
    finally:
        try:  # libfuse unmounts on a clean exit; this covers the rest
            _umount_detach(mount_dir)
        except OSError:
            pass
        if remove_dir:
            try:
                os.rmdir(mount_dir)
            except OSError:
                pass
    return 0


# ---------------------------------------------------------------- the VMM's side


def _check_environment(base_path: str) -> int:
    """The errors a user can fix, found before starting anything; returns the
    base's size."""
    try:
        fd = os.open(base_path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UserError(f"disk image {base_path!r} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot open disk image {base_path!r}: {e.strerror}") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if size == 0 or size % SECTOR:
        raise UserError(f"disk image {base_path!r} is {size} bytes, not a (non-zero) multiple of {SECTOR}")
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        raise UserError(f"/dev/fuse is not usable ({e.strerror}): the disk overlay needs FUSE (modprobe fuse)") from None
    try:
        ctypes.CDLL("libfuse.so.2")
    except OSError:
        raise UserError("libfuse (libfuse.so.2) is missing: apt-get install libfuse2") from None
    return size


_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="overlay-spawner")


class OverlayError(Exception):
    """The overlay daemon failed or did not answer (not the user's doing)."""


class OverlayMount:
    """The VMM's handle on one overlay daemon: `image_path` is the file to
    give virtio-blk; drop() / commit() / stats() are synchronous requests."""

    def __init__(self, base_path: str, mount_dir: str | None = None, block_size: int = 4096):
        if block_size <= 0 or block_size % SECTOR:
            raise UserError(f"overlay block size must be a positive multiple of {SECTOR}, got {block_size}")
        self.base_path = os.path.abspath(base_path)
        self.size = _check_environment(self.base_path)
        self._lock = threading.Lock()
        self._buf = b""
        self._proc = None
        self._sock = None
        self._closed = False
        self._made_dir = True  # then the daemon and close() remove it
        if mount_dir is None:
            os.makedirs(DEFAULT_ROOT, mode=0o700, exist_ok=True)
            # The leading pid is how cleanup_stale() tells a dead run's mount.
            mount_dir = tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=DEFAULT_ROOT)
        elif os.path.isdir(mount_dir):
            self._made_dir = False
            if os.listdir(mount_dir) or os.path.realpath(mount_dir) in _mount_points():
                raise UserError(f"overlay mount point {mount_dir!r} is not an empty, unmounted directory")
        elif os.path.lexists(mount_dir):
            raise UserError(f"overlay mount point {mount_dir!r} is not a directory")
        else:
            os.makedirs(mount_dir, mode=0o700)
        self.mount_dir = os.path.abspath(mount_dir)
        self.image_path = os.path.join(self.mount_dir, os.path.basename(self.base_path))
        try:
            self._start(block_size)
        except BaseException:
            self.close()
            raise

    def _start(self, block_size: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock = ours
        self._stderr = tempfile.TemporaryFile()
        env = dict(os.environ, FUSE_LIBRARY_PATH="libfuse.so.2")  # skip fusepy's find_library (runs ldconfig)
        argv = [sys.executable, "-m", "kvmcolo.disk_buffer", "serve", "--base", self.base_path,
                "--mount", self.mount_dir, "--block-size", str(block_size), "--control-fd", str(theirs.fileno()),
                "--parent", str(os.getpid())] + (["--remove-dir"] if self._made_dir else [])  # fmt: skip
        try:
            # Own session: a Ctrl-C at the terminal goes to the VMM, which
            # closes us in order after the guest's disk is closed.
            # Started from one thread that lives as long as the VMM: the
            # daemon's death signal follows the thread that started it, and a
            # switchover mounts from a thread that ends soon after.
            self._proc = _SPAWNER.submit(subprocess.Popen, argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=self._stderr,
                                         start_new_session=True).result()  # fmt: skip
        finally:
            theirs.close()
        deadline = time.monotonic() + READY_TIMEOUT
        try:
            message = self._receive(deadline, waiting_for="ready")
        except OverlayError as e:
            raise UserError(f"disk overlay for {self.base_path!r} did not start: {e}") from None
        if "ready" not in message:
            said = self._daemon_stderr()
            raise UserError(f"disk overlay for {self.base_path!r} failed: {message.get('error', message)}"
                            + (f" ({said.splitlines()[-1]})" if said else ""))  # fmt: skip
        # The daemon answers once libfuse got the kernel's INIT; check the file is really there.
        while True:
            try:
                st = os.stat(self.image_path)
                fd = os.open(self.image_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.pread(fd, SECTOR, 0)
                finally:
                    os.close(fd)
                if st.st_size != self.size:
                    raise UserError(f"disk overlay shows {st.st_size} bytes, the base has {self.size}")
                break
            except (FileNotFoundError, ConnectionError) as e:
                if time.monotonic() > deadline:
                    raise UserError(f"disk overlay for {self.base_path!r} never became readable: {e}") from None
                time.sleep(0.01)
        log.info("disk overlay of %s mounted at %s (daemon pid %d)", self.base_path, self.mount_dir, self._proc.pid)

    def _daemon_stderr(self) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read()[-2000:].decode(errors="replace").strip()
        except (OSError, ValueError, AttributeError):
            return ""

    def _receive(self, deadline: float, waiting_for: str) -> dict:
        """One JSON line from the daemon; the daemon's death or silence past
        the deadline becomes an error naming what it said on stderr."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise OverlayError(f"overlay daemon did not answer {waiting_for!r} in time")
            ready, _, _ = select.select([self._sock], [], [], min(left, 0.5))
            chunk = self._sock.recv(65536) if ready else None
            if chunk == b"":
                status = self._proc.wait(timeout=5)
                said = self._daemon_stderr()
                raise OverlayError(f"the overlay daemon exited (status {status})"
                                   + (f": {said.splitlines()[-1]}" if said else ""))  # fmt: skip
            if chunk:
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _call(self, op: str, timeout: float = CALL_TIMEOUT) -> dict:
        with self._lock:
            if self._closed:
                raise OverlayError(f"overlay of {self.base_path!r} is closed")
            try:
                _send(self._sock, {"op": op})
            except OSError as e:
                raise OverlayError(f"overlay daemon is gone ({e})") from None
            reply = self._receive(time.monotonic() + timeout, waiting_for=op)
        if "error" in reply:
            raise OverlayError(f"overlay {op} failed: {reply['error']}")
        return reply["return"]

    def drop(self) -> None:
        """Discard every overlay block (the SVM is paused)."""
        self._call("drop")

    def commit(self) -> None:
        """Failover: the overlay goes into the base (fsynced), later writes go
        straight to the base."""
        self._call("commit", COMMIT_TIMEOUT)

    def buffer(self) -> None:
        """After a commit: buffer the guest's writes in the overlay again (the
        VMM becomes a secondary again, at a switchover)."""
        self._call("buffer")

    def stats(self) -> dict:
        return dict(self._call("stats"), mount_dir=self.mount_dir, daemon_pid=self._proc.pid)

    def close(self) -> None:
        """Unmount and stop the daemon: SIGTERM (libfuse leaves its loop and
        unmounts), SIGKILL if it hangs, and a lazy unmount here for anything
        left.  Safe to call twice or after the daemon died."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.warning("overlay daemon %d ignored SIGTERM; killing it", self._proc.pid)
                    self._proc.kill()
                    self._proc.wait()
            said = self._daemon_stderr()
            if said:
                log.debug("overlay daemon said: %s", said)
        if self._sock is not None:
            self._sock.close()
        if getattr(self, "_stderr", None) is not None:
            self._stderr.close()
        if getattr(self, "mount_dir", None):
            try:
                _umount_detach(self.mount_dir)
            except OSError as e:
                log.warning("could not unmount %s: %s", self.mount_dir, e)
            if self._made_dir:
                try:
                    os.rmdir(self.mount_dir)
                except OSError:
                    pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def cleanup_stale(root: str = DEFAULT_ROOT) -> list[str]:
        """Unmount (lazily) and remove the mount dirs under `root` whose owner
        (the pid their name starts with) is dead: what a SIGKILLed VMM or
        daemon left behind ("Transport endpoint is not connected")."""
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            return []
        mounted = _mount_points()
        cleaned = []
        for name in sorted(names):
            m = re.match(r"(\d+)", name)
            if not m or pid_alive(int(m.group(1))):
                continue
            path = os.path.join(os.path.realpath(root), name)
            try:
                if path in mounted:
                    _umount_detach(path)
                os.rmdir(path)
            except OSError as e:
                log.warning("could not clean stale overlay mount %s: %s", path, e)
                continue
            cleaned.append(path)
        if cleaned:
            log.info("cleaned %d stale overlay mount(s) under %s", len(cleaned), root)
        return cleaned


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvmcolo.disk_buffer", description="kvmcolo's FUSE disk overlay daemon")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="mount and serve one overlay (started by OverlayMount)")
    s.add_argument("--base", required=True)
    s.add_argument("--mount", required=True)
    s.add_argument("--block-size", type=int, default=4096)
    s.add_argument("--control-fd", type=int, required=True)
    s.add_argument("--parent", type=int, required=True)
    s.add_argument("--remove-dir", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="kvmcolo overlay daemon: %(message)s")
    return serve(args.base, args.mount, args.block_size, args.control_fd, args.parent, args.remove_dir)


if __name__ == "__main__":
    sys.exit(main())
