"""Snapshots end to end: capture a running guest, restore it in a NEW VMM
process, and check it simply continues — RAM, every register set, timers,
both vCPUs, and devices (disk and network) included."""

from __future__ import annotations

import json
import re
import socket
import stat
import struct
import time

import pytest

from conftest import kvmcolo_cmd, require_device
from disk_records import read_records
from guest_net import COUNTER_PORT, GUEST_ADDR, NetsrvGuest
from vmm_process import GuestProcess, kvmcolo_exe


def start_vmm(tmp_path, name: str, *args: str) -> GuestProcess:
    g = GuestProcess([kvmcolo_exe(), args[0], "--control", str(tmp_path / f"{name}.sock"), *args[1:]])
    wait_socket(g)
    return g


def wait_socket(g: GuestProcess, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            g.call("query-status")
            return
        except Exception:  # noqa: BLE001 - not up yet
            if g.proc.poll() is not None:
                raise AssertionError("VMM exited:\n" + "\n".join(g.lines[-10:] + g.stderr_lines[-10:]))
            time.sleep(0.05)
    raise AssertionError("control socket never came up")


def restore(tmp_path, name: str, *files, paused: bool = False) -> GuestProcess:
    g = GuestProcess([kvmcolo_exe(), "restore", *map(str, files), *(["--paused"] if paused else []),
                      "--control", str(tmp_path / f"{name}.sock")])  # fmt: skip
    wait_socket(g)
    return g


def passes(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.search(r"dirty: pass=(\d+) ok", line))]


def quit_vmm(g: GuestProcess) -> int:
    g.call("quit")
    return g.proc.wait(10)


# ---- RAM, registers, progress -------------------------------------------------------


def test_restore_in_a_new_process_continues_with_identical_state(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "dirty", "--", "pages=512", "report=200")
    a.wait_line(r"dirty: pass=1000 ok")
    a.call("stop")
    before = a.call("query-state-hash")
    snap = a.call("snapshot", path=str(tmp_path / "full.snap"))
    assert snap["kind"] == "full" and snap["pages"] >= 512
    last_before = max(passes(a.lines))
    assert quit_vmm(a) == 0

    b = restore(tmp_path, "b", tmp_path / "full.snap", paused=True)
    try:
        after = b.call("query-state-hash")
        differing = sorted(k for k in before if before[k] != after.get(k))
        assert not differing, f"state differs after restore: {differing}"
        assert set(before) == set(after)
        b.call("cont")
        b.wait_line(r"dirty: pass=\d+ ok")
        b.wait_line(rf"dirty: pass={last_before + 1000} ok", timeout=60)
        assert not any("dirty: start" in line for line in b.lines)  # continued, not rebooted
        assert min(passes(b.lines)) > last_before - 200  # resumed within the pass it was in
        assert not any("FAIL" in line for line in b.lines)
    finally:
        quit_vmm(b)


def test_incremental_chain_equals_a_full_snapshot(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "dirty", "--", "pages=256", "report=1000")
    files = [tmp_path / f"s{i}.snap" for i in range(4)]
    a.wait_line(r"dirty: pass=1000 ok")
    a.call("snapshot", path=str(files[0]))
    for f in files[1:3]:
        a.wait_line(r"dirty: pass=\d+ ok", start=len(a.lines))  # the guest moved on
        assert a.call("snapshot", path=str(f), incremental=True)["kind"] == "incremental"
    a.call("stop")
    a.call("snapshot", path=str(files[3]), incremental=True)
    a.call("snapshot", path=str(tmp_path / "whole.snap"))
    quit_vmm(a)

    chain = restore(tmp_path, "chain", *files, paused=True)
    whole = restore(tmp_path, "whole", tmp_path / "whole.snap", paused=True)
    try:
        assert chain.call("query-state-hash") == whole.call("query-state-hash")
        chain.call("cont")
        chain.wait_line(r"dirty: pass=\d+ ok", timeout=30)
        assert not any("FAIL" in line for line in chain.lines)
    finally:
        quit_vmm(chain)
        quit_vmm(whole)


def test_chain_out_of_order_is_refused(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "dirty", "--", "report=100000")
    a.call("snapshot", path=str(tmp_path / "s0"))
    a.call("snapshot", path=str(tmp_path / "s1"), incremental=True)
    a.call("snapshot", path=str(tmp_path / "s2"), incremental=True)
    quit_vmm(a)
    for files, words in (((tmp_path / "s0", tmp_path / "s2"), "does not follow"),
                         ((tmp_path / "s1",), "starts from a full snapshot")):  # fmt: skip
        proc = kvmcolo_cmd("restore", *map(str, files), "--control", str(tmp_path / "x.sock"))
        assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_vmm_written_pages_are_in_incremental_snapshots(images):
    """Pages only the VMM wrote (as device DMA does) must travel in an
    incremental snapshot: KVM's dirty log never sees them."""
    from kvmcolo import guest_images, sections, vmstate
    from kvmcolo.console_buffer import ConsoleBuffer
    from kvmcolo import dirty_log
    from kvmcolo.machine import Machine, MachineConfig

    sink = ConsoleBuffer()
    m = Machine(MachineConfig(kernel=str(guest_images.image_path("dirty")), cmdline="pages=16 report=100000",
                              serial_output=sink))  # fmt: skip
    try:
        log = dirty_log.of(m).reader("snapshot")
        host = vmstate.HostCaps.probe(m.kvm, m.vm.vcpus[0])
        m.start()
        sink.wait_for(r"dirty: start")
        m.hold("snapshot")
        full = vmstate.capture(m, log, vmstate.KIND_FULL, None, host)
        dma = bytes(range(256)) * 16
        m.vm.memory.write(0x800000, dma)  # the guest never touches 8 MiB
        incr = vmstate.capture(m, log, vmstate.KIND_INCREMENTAL, full.meta["id"], host)
        blobs = [b"".join(bytes(p) for p in sections.encode(c.sections)) for c in (full, incr)]
    finally:
        m.close()
    snaps = [vmstate.parse(b) for b in blobs]
    restored = Machine(Machine.config_from_shape(snaps[-1].meta["machine"], serial_output=ConsoleBuffer()),
                       boot_kernel=False)  # fmt: skip
    try:
        for s in snaps:
            vmstate.apply_ram(restored.vm.memory, s)
        assert restored.vm.memory.read(0x800000, len(dma)) == dma
    finally:
        restored.close()


# ---- timers and SMP ---------------------------------------------------------------------


def test_lapic_timer_sleeper_keeps_waking_after_restore(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "hello", "--", "ticks=1500")
    a.wait_line(r"hello: cpus=")
    time.sleep(0.5)  # well inside the 1.5 s of timer sleeps
    a.call("snapshot", path=str(tmp_path / "t.snap"))
    quit_vmm(a)
    b = restore(tmp_path, "b", tmp_path / "t.snap")
    m = b.wait_line(r"hello: ticks=1500 hz=1000 elapsed_us=(\d+)", timeout=30)
    assert b.proc.wait(10) == 0
    # No clock-jump storm: the remaining ticks took about as long as they should.
    assert int(m.group(1)) < 10_000_000


def test_two_vcpu_guest_round_trips(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "smp", "--cpus", "2", "--", "rounds=1000000", "interval=50")
    a.wait_line(r"smp: round=5 ")
    a.call("snapshot", path=str(tmp_path / "smp.snap"))
    last = max(int(m.group(1)) for line in a.lines if (m := re.search(r"smp: round=(\d+) ", line)))
    quit_vmm(a)
    b = restore(tmp_path, "b", tmp_path / "smp.snap")
    try:
        rounds = []
        for _ in range(4):
            m = b.wait_line(r"smp: round=(\d+) cpu0=(\d+) cpu1=(\d+)", start=len(b.lines))
            rounds.append(tuple(int(x) for x in m.groups()))
        assert rounds[0][0] <= last + 3  # continues from where it was
        for (r0, a0, b0), (r1, a1, b1) in zip(rounds, rounds[1:]):
            assert r1 == r0 + 1 and a1 > a0 and b1 > b0  # both vCPUs progress
    finally:
        quit_vmm(b)


# ---- devices ----------------------------------------------------------------------------


def test_disk_guest_continues_writing_after_restore(images, tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(8 << 20)
    a = start_vmm(tmp_path, "a", "run", "--image", "disk", "--disk", str(img), "--",
                  "records=0", "rate=100", "report=10")  # fmt: skip
    a.wait_line(r"disk: wrote=30")
    a.call("snapshot", path=str(tmp_path / "d.snap"))
    quit_vmm(a)
    b = restore(tmp_path, "b", tmp_path / "d.snap")
    try:
        b.wait_line(r"disk: wrote=\d+", timeout=30)
        b.wait_line(r"disk: wrote=80", timeout=30)
        assert not any("FAIL" in line or "CORRUPT" in line for line in b.lines)
    finally:
        quit_vmm(b)
    assert read_records(img) >= 80  # no gap, no corruption, all on the image


def test_netsrv_keeps_serving_after_restore(images, tmp_path):
    require_device("/dev/net/tun", "tun/tap")
    g = NetsrvGuest("snap", extra_args=["--control", str(tmp_path / "n.sock")])
    try:
        with g.ns.entered():
            conn = socket.create_connection((GUEST_ADDR, COUNTER_PORT), timeout=10)
        values = []
        for _ in range(20):
            conn.sendall(b"next\n")
            values.append(int(conn.makefile().readline()))
        g.vmm.call("snapshot", path=str(tmp_path / "n.snap"))
        g.vmm.call("quit")
        g.vmm.proc.wait(10)
        # The same tap, a new VMM process; the client's TCP connection stays open.
        b = GuestProcess(g.ns.cmd(kvmcolo_exe(), "restore", str(tmp_path / "n.snap"),
                                  "--control", str(tmp_path / "n2.sock")))  # fmt: skip
        try:
            wait_socket(b)
            reader = conn.makefile()
            for _ in range(20):
                conn.sendall(b"next\n")
                values.append(int(reader.readline()))
            assert values == list(range(values[0], values[0] + 40))  # the counter continued
            with g.ns.entered():
                fresh = socket.create_connection((GUEST_ADDR, COUNTER_PORT), timeout=10)
            fresh.sendall(b"x\n")
            assert int(fresh.makefile().readline()) == values[-1] + 1
            fresh.close()
        finally:
            conn.close()
            b.call("quit")
            b.proc.wait(10)
    finally:
        g.close()


# ---- bad snapshot files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_snapshot(images, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("snap")
    a = start_vmm(tmp, "a", "run", "--image", "dirty", "--", "pages=64", "report=100000")
    a.call("snapshot", path=str(tmp / "good.snap"))
    quit_vmm(a)
    return (tmp / "good.snap").read_bytes()


def rewrite_meta(blob: bytes, change) -> bytes:
    """Re-encode a snapshot with META changed (valid CRCs: only the content is wrong)."""
    from kvmcolo import sections, vmstate

    secs = sections.decode(blob, vmstate.KNOWN_SECTIONS)
    for s in secs:
        if s.tag == b"META":
            meta = json.loads(bytes(s.payload))
            change(meta)
            s.payload = json.dumps(meta).encode()
    return b"".join(bytes(p) for p in sections.encode(secs))


def bad_variants(blob: bytes) -> dict[str, tuple[bytes, str]]:
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x40
    newer = bytearray(blob)
    struct.pack_into("<I", newer, 8, 2)
    return {
        "corrupt": (bytes(flipped), "corrupt"),
        "truncated": (blob[: len(blob) * 2 // 3], "truncated"),
        "empty": (b"", "truncated"),
        "not-a-snapshot": (b"hello world, not a snapshot" * 10, "bad magic"),
        "wrong-version": (bytes(newer), "format version 2 is not supported"),
        "wrong-cpu": (rewrite_meta(blob, lambda m: m["host"]["cpuid"].__setitem__("0x7.0", [0, 0xFFFFFFFF, 0, 0])),
                      "lacks CPUID"),
        "wrong-xsave": (rewrite_meta(blob, lambda m: m["host"].__setitem__("xsave_size", 1 << 20)), "XSAVE"),
    }  # fmt: skip


@pytest.mark.parametrize("variant", ["corrupt", "truncated", "empty", "not-a-snapshot", "wrong-version",
                                     "wrong-cpu", "wrong-xsave"])  # fmt: skip
def test_bad_snapshot_files_are_refused_before_anything_starts(good_snapshot, tmp_path, variant):
    data, words = bad_variants(good_snapshot)[variant]
    path = tmp_path / f"{variant}.snap"
    path.write_bytes(data)
    sock = tmp_path / "never.sock"
    proc = kvmcolo_cmd("restore", str(path), "--control", str(sock), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not sock.exists()  # nothing was started
    assert proc.stdout == ""


def test_section_crc_catches_every_single_byte_flip(good_snapshot):
    """Any one flipped byte in the stream is rejected by decode (sampled)."""
    from kvmcolo import sections, vmstate

    step = max(1, len(good_snapshot) // 300)
    for at in list(range(0, 200)) + list(range(200, len(good_snapshot), step)):
        bad = bytearray(good_snapshot)
        bad[at] ^= 0x01
        with pytest.raises(sections.StateFormatError):
            vmstate.parse(bytes(bad))
    vmstate.parse(good_snapshot)  # and the untouched one parses


# ---- the control socket ----------------------------------------------------------------------


def test_control_socket_commands_and_bad_input(images, tmp_path):
    a = start_vmm(tmp_path, "a", "run", "--image", "dirty", "--", "pages=64", "report=100000")
    path = tmp_path / "a.sock"
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert a.call("query-status")["status"] == "running"
        assert a.call("stop")["status"] == "paused"
        assert a.call("query-status")["status"] == "paused"
        assert len(a.call("query-state-hash")) > 10
        assert a.call("cont")["status"] == "running"
        stats = a.call("query-stats")
        assert stats["vcpus"][0]["exits"] > 0
        assert a.call("snapshot", path=str(tmp_path / "c.snap"))["kind"] == "full"

        raw = socket.socket(socket.AF_UNIX)
        raw.connect(str(path))
        f = raw.makefile("rwb")
        assert "kvmcolo" in json.loads(f.readline())
        for line, cls in ((b"this is not json", "InvalidJSON"), (b'["execute"]', "InvalidRequest"),
                          (b'{"execute": "no-such-thing"}', "CommandNotFound"),
                          (b'{"execute": "snapshot", "arguments": {"bogus": 1}}', "InvalidArguments"),
                          (b'{"execute": "query-status", "arguments": []}', "InvalidRequest")):  # fmt: skip
            f.write(line + b"\n")
            f.flush()
            assert json.loads(f.readline())["error"]["class"] == cls
        f.write(b'{"execute": "query-status", "id": 7}\n')
        f.flush()
        reply = json.loads(f.readline())
        assert reply["id"] == 7 and reply["return"]["status"] == "running"
        raw.close()

        status = kvmcolo_cmd("status", "--control", str(path))
        assert status.returncode == 0 and status.stdout.startswith("running")
        assert kvmcolo_cmd("stop", "--control", str(path)).returncode == 0
        assert kvmcolo_cmd("cont", "--control", str(path)).returncode == 0
        snap = kvmcolo_cmd("snapshot", str(tmp_path / "cli.snap"), "--incremental", "--control", str(path))
        assert snap.returncode == 0 and "incremental snapshot" in snap.stdout
        assert kvmcolo_cmd("quit", "--control", str(path)).returncode == 0
        assert a.proc.wait(10) == 0
        assert not path.exists()  # removed at exit
    finally:
        a.stop()


def test_client_without_a_vmm_is_a_user_error(tmp_path):
    proc = kvmcolo_cmd("status", "--control", str(tmp_path / "none.sock"))
    assert proc.returncode == 2 and "no control socket" in proc.stderr
