"""The FUSE disk overlay: OverlayCore's plans against a bytearray model
(Hypothesis), then a real mount: reads/writes, drop, commit, a base rewritten
behind the mount, and the mount going away on every exit path."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import require_device
from kvmcolo.disk_buffer import BASE, OVERLAY, OverlayCore, OverlayMount, _mount_points
from kvmcolo.errors import UserError


# ---------------------------------------------------------------- the core against a model


class Sim:
    """Runs OverlayCore's plans on bytearrays, the way the daemon runs them on
    the base and scratch files."""

    def __init__(self, base: bytes, block_size: int):
        self.base = bytearray(base)
        self.scratch = bytearray()
        self.core = OverlayCore(len(base), block_size)

    def _buf(self, source):
        return self.base if source == BASE else self.scratch

    @staticmethod
    def _put(buf: bytearray, offset: int, data: bytes) -> None:
        if len(buf) < offset + len(data):
            buf.extend(bytes(offset + len(data) - len(buf)))
        buf[offset : offset + len(data)] = data

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for e in self.core.plan_read(offset, length):
            assert e.data_offset == len(out) and e.length > 0
            buf = self._buf(e.source)
            assert e.offset + e.length <= len(buf)
            out += buf[e.offset : e.offset + e.length]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        plan = self.core.plan_write(offset, len(data))
        for base_off, scratch_off, n in plan.fills:
            self._put(self.scratch, scratch_off, self.base[base_off : base_off + n])
        covered = 0
        for e in plan.extents:
            assert e.data_offset == covered
            self._put(self._buf(e.source), e.offset, data[e.data_offset : e.data_offset + e.length])
            covered += e.length
        assert covered == len(data)
        self.core.apply_write(plan)

    def drop(self) -> None:
        self.core.drop()
        self.scratch = bytearray()

    def commit(self) -> None:
        for src, dst, n in self.core.plan_commit():
            self._put(self.base, dst, self.scratch[src : src + n])
        self.core.finish_commit()
        self.scratch = bytearray()


@st.composite
def scenarios(draw):
    block_size = draw(st.sampled_from([512, 1024, 4096]))
    size = 512 * draw(st.integers(1, 40))  # often not a multiple of the block size: a short last block
    ops = draw(st.lists(st.one_of(
        st.tuples(st.just("write"), st.integers(0, size + 600), st.integers(0, 3 * block_size), st.integers(0, 255)),
        st.tuples(st.just("read"), st.integers(0, size + 600), st.integers(0, 3 * block_size)),
        st.tuples(st.just("drop")),
        st.tuples(st.just("commit")),
    ), max_size=40))  # fmt: skip
    return block_size, size, ops


@settings(max_examples=400, deadline=None)
@given(scenarios())
def test_core_matches_model(scenario):
    block_size, size, ops = scenario
    base = bytes((i * 7 + i // 251) & 0xFF for i in range(size))
    sim = Sim(base, block_size)
    disk = bytearray(base)  # what the guest must see
    on_base = bytearray(base)  # what the base image must hold
    for op in ops:
        if op[0] == "write":
            _, offset, length, fill = op
            data = bytes((fill + i) & 0xFF for i in range(length))
            if offset + length > size:
                with pytest.raises(OSError) as e:
                    sim.write(offset, data)
                assert e.value.errno == errno.EFBIG
                continue
            sim.write(offset, data)
            disk[offset : offset + length] = data
            if sim.core.passthrough:
                on_base[offset : offset + length] = data
        elif op[0] == "read":
            _, offset, length = op
            assert sim.read(offset, length) == bytes(disk[offset : offset + length])
        elif op[0] == "drop":
            sim.drop()
            disk[:] = on_base  # the base view is back
            assert sim.core.blocks == 0
        else:
            sim.commit()
            on_base[:] = disk
            assert sim.core.passthrough and sim.core.blocks == 0
        assert sim.base == on_base  # nothing reaches the base before commit
        assert sim.read(0, size) == disk


def test_core_plans_merge_runs():
    core = OverlayCore(1 << 20, 4096)
    plan = core.plan_write(4096 * 10 + 100, 4096 * 4)  # 5 new blocks, partial at both ends
    assert [(b, s) for b, s in sorted(plan.new_slots.items())] == [(10 + i, i) for i in range(5)]
    assert sorted(plan.fills) == [(4096 * 10, 0, 4096), (4096 * 14, 4 * 4096, 4096)]
    assert len(plan.extents) == 1
    core.apply_write(plan)
    extents = core.plan_read(4096 * 9, 4096 * 7)
    assert [(e.source, e.length) for e in extents] == [(BASE, 4096), (OVERLAY, 4096 * 5), (BASE, 4096)]
    assert core.plan_commit() == [(0, 4096 * 10, 4096 * 5)]
    # a stale plan (made before a drop) is refused
    stale = core.plan_write(0, 10)
    core.drop()
    with pytest.raises(RuntimeError):
        core.apply_write(stale)


# ---------------------------------------------------------------- a real mount


@pytest.fixture(scope="module")
def fuse_device():
    require_device("/dev/fuse", "FUSE")


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


def is_mounted(path: str) -> bool:
    return os.path.realpath(path) in _mount_points()


def wait_unmounted(path: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while is_mounted(path):
        assert time.monotonic() < deadline, f"{path} is still mounted after {timeout} s"
        time.sleep(0.02)


def test_reads_writes_drop_commit(fuse_device, base, tmp_path):
    original = base.read_bytes()
    with OverlayMount(str(base), str(tmp_path / "mnt")) as m:
        assert os.path.basename(m.image_path) == "disk.img" and os.path.getsize(m.image_path) == 1 << 20
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            assert os.pread(fd, 1 << 20, 0) == original
            os.pwrite(fd, b"A" * 10000, 1000)  # unaligned, straddles three blocks
            os.pwrite(fd, b"B" * 65536, 200 << 10)
            expect = bytearray(original)
            expect[1000:11000] = b"A" * 10000
            expect[200 << 10 : (200 << 10) + 65536] = b"B" * 65536
            assert os.pread(fd, 1 << 20, 0) == expect
            assert base.read_bytes() == original  # the base is untouched
            s = m.stats()
            assert s["overlay_blocks"] == 3 + 16 and s["writes"] == 2 and not s["passthrough"]

            m.drop()
            assert os.pread(fd, 1 << 20, 0) == original and m.stats()["overlay_blocks"] == 0

            os.pwrite(fd, b"C" * 5000, 3000)
            m.commit()
            expect = bytearray(original)
            expect[3000:8000] = b"C" * 5000
            assert base.read_bytes() == expect and os.pread(fd, 1 << 20, 0) == expect
            os.pwrite(fd, b"D" * 100, 50)  # passthrough: straight to the base
            os.fsync(fd)
            expect[50:150] = b"D" * 100
            assert base.read_bytes() == expect
            s = m.stats()
            assert s["passthrough"] and s["overlay_blocks"] == 0

            with pytest.raises(OSError) as e:
                os.pwrite(fd, b"x" * 10, (1 << 20) - 5)
            assert e.value.errno == errno.EFBIG
            with pytest.raises(OSError) as e:
                os.truncate(m.image_path, 4096)
            assert e.value.errno == errno.EPERM
        finally:
            os.close(fd)
    assert not is_mounted(str(tmp_path / "mnt"))


def test_base_rewritten_behind_the_mount(fuse_device, base, tmp_path):
    """The lead's checkpoint rewrites the base while the SVM is paused, then
    drops: no read may come from a stale kernel cache."""
    with OverlayMount(str(base), str(tmp_path / "mnt")) as m:
        fd = os.open(m.image_path, os.O_RDWR)
        try:
            os.pwrite(fd, b"overlay!" * 512, 8192)  # block 2 is in the overlay
            assert os.pread(fd, 8, 8192) == b"overlay!" and os.pread(fd, 4096, 0) == base.read_bytes()[:4096]
            with open(base, "r+b") as f:  # rewrite blocks 0 and 2 of the base
                f.seek(0)
                f.write(b"new-base" * 512)
                f.seek(8192)
                f.write(b"applied!" * 512)
            assert os.pread(fd, 8, 0) == b"new-base"  # not in the overlay: the new base at once
            assert os.pread(fd, 8, 8192) == b"overlay!"  # the overlay still wins until the drop
            m.drop()
            assert os.pread(fd, 4096, 8192) == b"applied!" * 512
            assert os.pread(fd, 4096, 0) == b"new-base" * 512
        finally:
            os.close(fd)


def test_close_is_idempotent_and_default_dir(fuse_device, base, tmp_path):
    m = OverlayMount(str(base))
    try:
        assert m.mount_dir.startswith("/run/kvmcolo/overlay/") and os.path.basename(m.mount_dir).startswith(f"{os.getpid()}-")
        assert is_mounted(m.mount_dir)
    finally:
        m.close()
    m.close()
    assert not is_mounted(m.mount_dir) and not os.path.exists(m.mount_dir)


def test_sigterm_to_the_daemon_unmounts(fuse_device, base, tmp_path):
    m = OverlayMount(str(base), str(tmp_path / "mnt"))
    try:
        os.kill(m.stats()["daemon_pid"], signal.SIGTERM)
        wait_unmounted(m.mount_dir)
        assert m._proc.wait(timeout=5) == 0
    finally:
        m.close()  # the daemon is gone already: no error


PARENT = textwrap.dedent("""
    import os, sys, time
    from kvmcolo.disk_buffer import OverlayMount
    m = OverlayMount(sys.argv[1], sys.argv[2].format(pid=os.getpid()))
    print(m.stats()["daemon_pid"], flush=True)
    time.sleep(60)
""")


def start_parent(base, mount_dir) -> tuple[subprocess.Popen, int]:
    """A small VMM stand-in that mounts an overlay and waits to be killed."""
    p = subprocess.Popen([sys.executable, "-c", PARENT, str(base), str(mount_dir)], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip().isdigit(), f"parent failed: {line!r} (status {p.poll()})"
    assert is_mounted(str(mount_dir).format(pid=p.pid))
    return p, int(line)


def test_sigkill_of_the_parent_unmounts(fuse_device, base, tmp_path):
    mount_dir = tmp_path / "mnt"
    parent, daemon = start_parent(base, mount_dir)
    parent.kill()
    parent.wait()
    wait_unmounted(str(mount_dir))  # PR_SET_PDEATHSIG -> SIGTERM -> libfuse leaves its loop and unmounts
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{daemon}") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists(f"/proc/{daemon}")
    assert not mount_dir.exists()  # the daemon removed the dir it was given to create


def test_sigkill_of_the_daemon_then_cleanup_stale(fuse_device, base, tmp_path):
    root = tmp_path / "overlay"
    root.mkdir()
    (root / "999999999-0").mkdir()  # an unmounted leftover; no such pid
    parent, daemon = start_parent(base, str(root / "{pid}-0"))
    stale = root / f"{parent.pid}-0"
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while True:
        try:
            os.stat(stale / "disk.img")
        except OSError as e:
            assert e.errno == errno.ENOTCONN  # the stale mount a SIGKILLed daemon leaves
            break
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert OverlayMount.cleanup_stale(str(root)) == [str(root / "999999999-0")]  # the owner is alive: kept
    parent.kill()
    parent.wait()
    assert is_mounted(str(stale))
    assert OverlayMount.cleanup_stale(str(root)) == [str(stale)]
    assert not is_mounted(str(stale)) and os.listdir(root) == []
    assert OverlayMount.cleanup_stale(str(root / "nope")) == []


def test_cleanup_stale_skips_live_owners(fuse_device, base, tmp_path):
    root = tmp_path / "overlay"
    with OverlayMount(str(base), str(root / f"{os.getpid()}-0")) as m:
        assert OverlayMount.cleanup_stale(str(root)) == []
        assert is_mounted(m.mount_dir)


def test_user_errors(fuse_device, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        OverlayMount(str(tmp_path / "missing.img"), str(tmp_path / "mnt"))
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with pytest.raises(UserError, match="multiple of 512"):
        OverlayMount(str(odd), str(tmp_path / "mnt"))
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="multiple of 512"):
        OverlayMount(str(empty), str(tmp_path / "mnt"))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    good = tmp_path / "good.img"
    good.write_bytes(bytes(4096))
    with pytest.raises(UserError, match="not an empty"):
        OverlayMount(str(good), str(busy))
