"""COLO with a disk: the secondary's writes live in a FUSE overlay, the
primary's are applied at checkpoints, and failover loses no acknowledged
write."""

from __future__ import annotations

import os
import re
import signal

import pytest

from colo_pair import ColoPair
from conftest import require_device, wait_until
from disk_records import read_records
from kvmcolo.disk_replication import file_hash, journal_path

DISK_GUEST = ["records=0", "rate=100", "report=5"]


@pytest.fixture
def fuse(images):
    require_device("/dev/fuse", "FUSE")


def images_pair(tmp_path, differ: bool = True):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for p in (a, b):
        with open(p, "wb") as f:
            f.truncate(8 << 20)
    if differ:  # the initial sync has something to do
        with open(b, "r+b") as f:
            f.seek(3 << 20)
            f.write(os.urandom(100_000))
    return a, b


def vm(img, overlay_dir=None):
    return ["--image", "disk", "--mem", "64M", "--disk", str(img)] + (["--overlay-dir", str(overlay_dir)] if overlay_dir else [])


def start(tmp_path, a, b, primary_args=(), secondary_args=(), env_a=None, env_b=None, wait: bool = True):
    pair = ColoPair(tmp_path, [], start=False)
    try:
        pair.start_secondary(vm(b, tmp_path / "ovl"), secondary_args, env=env_b)
        pair.start_primary(vm(a), DISK_GUEST, primary_args, wait=wait, env=env_a)
    except BaseException:
        pair.close()
        raise
    return pair


def wrote(lines) -> int:
    return max((int(m.group(1)) for line in lines if (m := re.search(r"disk: wrote=(\d+)", line))), default=0)


def mounts_under(path, pid: int) -> list[str]:
    """FUSE mounts below `path` as process `pid` sees them (`ip netns exec`
    gives the secondary its own mount namespace)."""
    try:
        lines = open(f"/proc/{pid}/mounts").read().splitlines()
    except FileNotFoundError:
        return []
    return [line.split()[1] for line in lines if line.split()[1].startswith(str(path))]


def overlay_daemons(path) -> list[int]:
    """Live FUSE overlay daemons serving mounts below `path`."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "kvmcolo.disk_buffer" in cmd and str(path) in cmd:
                found.append(int(entry))
    return found


@pytest.mark.parametrize("notify", [[], ["--no-ioeventfd"]], ids=["ioeventfd", "mmio-exit"])
def test_disks_identical_at_every_checkpoint(fuse, tmp_path, notify):
    # mmio-exit: the guest's notifications come as MMIO exits; served on the I/O
    # thread, the forwarded writes stay ordered before each capture.
    a, b = images_pair(tmp_path)
    pair = start(tmp_path, a, b, ["--verify-every", "3", *notify], ["--verify-every", "3", *notify])
    try:
        pair.wait_checkpoints(tmp_path / "a.sock", 25, timeout=90)
        p, s = pair.colo("a")["hashes"], pair.colo("b")["hashes"]
        common = sorted(set(p) & set(s), key=int)
        assert len(common) >= 5
        for seq in common:
            assert p[seq]["disk.0"] == s[seq]["disk.0"], f"checkpoint {seq}: base image differs from the primary's"
            assert not [k for k in p[seq] if p[seq][k] != s[seq].get(k)]
        assert wrote(pair.primary.lines) >= 10
    finally:
        pair.close()


def test_secondary_writes_never_reach_the_base_between_checkpoints(fuse, tmp_path):
    a, b = images_pair(tmp_path, differ=False)
    pair = start(tmp_path, a, b, ["--checkpoint-delay", "4000"])
    try:
        wait_until(lambda: wrote(pair.secondary.lines), "the SVM writing records")
        c0 = pair.colo("a")["checkpoints"]
        before, w0 = file_hash(str(b)), wrote(pair.secondary.lines)
        wait_until(lambda: wrote(pair.secondary.lines) > w0 + 10, "the SVM writing more records")  # ...it did
        assert pair.colo("a")["checkpoints"] == c0  # (no checkpoint in this window: the delay is 4 s)
        assert file_hash(str(b)) == before  # ...but only into its overlay
    finally:
        pair.close()


@pytest.mark.parametrize("when", ["between", "mid-transfer"])
def test_failover_keeps_every_acknowledged_record(fuse, tmp_path, when):
    a, b = images_pair(tmp_path)
    stall = {"KVMCOLO_TEST_HOOKS": "stall-transfer-ms:600"} if when == "mid-transfer" else None
    pair = start(tmp_path, a, b, env_a=stall)
    try:
        pair.wait_checkpoints(tmp_path / "a.sock", 5)
        pair.wait_phase("a", "sending-stalled" if when == "mid-transfer" else "idle")
        pair.primary.proc.kill()
        pair.wait_failover("b")
        start_lines = len(pair.secondary.lines)
        pair.secondary.wait_line(r"disk: wrote=\d+", start=start_lines, timeout=20)
        first = wrote(pair.secondary.lines)
        wait_until(lambda: wrote(pair.secondary.lines) > first + 10, "the survivor writing on")
        acknowledged = wrote(pair.secondary.lines)
        assert not any("CORRUPT" in line or "GAP" in line or "FAIL" in line for line in pair.secondary.lines)
        from kvmcolo import control

        control.call(str(tmp_path / "b.sock"), "quit")
        assert pair.secondary.proc.wait(20) == 0
        assert read_records(b) >= acknowledged  # every acknowledged record, no gap, no corruption
        wait_until(lambda: not overlay_daemons(tmp_path / "ovl"), "the overlay daemon to exit")
    finally:
        pair.close()


def test_secondary_killed_during_an_apply_replays_its_journal(fuse, tmp_path):
    a, b = images_pair(tmp_path, differ=False)
    pair = start(tmp_path, a, b, env_b={"KVMCOLO_TEST_HOOKS": "crash:disk-apply"}, wait=False)
    try:
        assert pair.secondary.proc.wait(30) == 70  # died right after the journal was made durable
        assert os.path.exists(journal_path(str(b)))
        pair.wait_failover("a")  # the primary goes on alone
        pair.secondary = None
        restarted = pair.start_secondary(vm(b, tmp_path / "ovl"))
        wait_until(lambda: any("replayed an unfinished disk journal" in line for line in restarted.stderr_lines),
                   "the restarted secondary replays its journal", timeout=10)  # fmt: skip
        assert not os.path.exists(journal_path(str(b)))
        assert read_records(b) >= 1  # the applied records are whole
    finally:
        pair.close()


@pytest.mark.parametrize("how", ["quit", "sigterm", "sigkill"])
def test_overlay_mount_is_gone_after_every_exit(fuse, tmp_path, how):
    a, b = images_pair(tmp_path, differ=False)
    pair = start(tmp_path, a, b)
    try:
        ovl = tmp_path / "ovl"
        assert len(mounts_under(ovl, pair.secondary.proc.pid)) == 1 and len(overlay_daemons(ovl)) == 1
        if how == "quit":
            from kvmcolo import control

            control.call(str(tmp_path / "b.sock"), "quit")
        else:
            pair.secondary.proc.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        pair.secondary.proc.wait(20)
        # The daemon unmounts and goes (on SIGKILL of the VMM: through its death signal).
        wait_until(lambda: not overlay_daemons(ovl), "the overlay daemon to exit")
        if how != "sigkill":  # after SIGKILL a leftover directory is the next start's to clean
            wait_until(lambda: not any(ovl.iterdir()), "the mount directory to be removed")
        pair.secondary = None
        restarted = pair.start_secondary(vm(b, ovl))  # and a new start finds a clean slate
        assert len(mounts_under(ovl, restarted.proc.pid)) == 1
        assert len(list(ovl.iterdir())) == 1, list(ovl.iterdir())
    finally:
        pair.close()


def test_a_disk_guest_protected_live_keeps_every_record(fuse, tmp_path):
    """`kvmcolo protect` of a disk guest that writes while it is copied: the
    secondary's stale image (a chunk of other data) is synced and the writes
    made during the pre-copy are forwarded, so the images are equal at every
    verified checkpoint; after the primary dies, every record the survivor
    acknowledged is on its disk."""
    a, b = images_pair(tmp_path)
    pair = ColoPair(tmp_path, [], start=False)
    try:
        guest = pair.start_alone(vm(a), DISK_GUEST)
        wait_until(lambda: wrote(guest.lines) >= 20, "the lone guest writing records")
        pair.start_secondary(vm(b, tmp_path / "ovl"), ["--verify-every", "3"])
        written_before = wrote(guest.lines)
        done = pair.protect(["--verify-every", "3"])
        assert done.returncode == 0, done.stderr + "\n".join(guest.stderr_lines[-20:])
        assert any(re.search(r"disk 0: [1-9]\d* of \d+ MiB differ", line) for line in guest.stderr_lines)  # synced
        pair.wait_checkpoints(tmp_path / "a.sock", 15, timeout=90)
        p, s = pair.colo("a")["hashes"], pair.colo("b")["hashes"]
        common = sorted(set(p) & set(s), key=int)
        assert len(common) >= 3
        for seq in common:
            assert p[seq]["disk.0"] == s[seq]["disk.0"], f"checkpoint {seq}: base image differs from the primary's"
        assert wrote(guest.lines) > written_before  # it wrote on through the copy
        pair.primary.proc.kill()
        pair.wait_failover("b")
        first = wrote(pair.secondary.lines)
        wait_until(lambda: wrote(pair.secondary.lines) > first + 10, "the survivor writing on")
        acknowledged = wrote(pair.secondary.lines)
        assert not any("CORRUPT" in line or "GAP" in line or "FAIL" in line for line in pair.secondary.lines)
        from kvmcolo import control

        control.call(str(tmp_path / "b.sock"), "quit")
        assert pair.secondary.proc.wait(20) == 0
        assert read_records(b) >= acknowledged
    finally:
        pair.close()
