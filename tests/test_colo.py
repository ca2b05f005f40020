"""COLO end to end: two VMM processes on two namespaced hosts keep one guest
in lock-step, survive the loss of either, and refuse strangers."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from colo_pair import ADDR_B, PORT, ColoPair, passes
from conftest import wait_until

VM = ["--image", "dirty", "--mem", "64M"]
DIRTY = ["pages=500", "report=500"]


def assert_same_state(pair: ColoPair, at_least: int) -> None:
    p, s = pair.colo("a")["hashes"], pair.colo("b")["hashes"]
    common = sorted(set(p) & set(s), key=int)
    assert len(common) >= at_least, (sorted(p), sorted(s))
    for seq in common:
        differing = sorted(k for k in p[seq] if p[seq][k] != s[seq].get(k))
        assert not differing, f"checkpoint {seq}: SVM differs from PVM in {differing}"


@pytest.mark.parametrize("image,cpus,args,early", [
    ("dirty", "1", DIRTY, []),
    ("dirty", "1", DIRTY, ["--no-resume-early"]),  # the PVM stays stopped until the SVM has loaded
    ("smp", "2", ["rounds=1000000000", "interval=200"], []),
], ids=["dirty", "dirty-no-resume-early", "smp"])  # fmt: skip
def test_lockstep_for_50_checkpoints(images, tmp_path, image, cpus, args, early):
    vm = ["--image", image, "--mem", "64M", "--cpus", cpus]
    pair = ColoPair(tmp_path, vm, args, primary_args=["--checkpoint-delay", "100", "--verify-every", "5", *early],
                    secondary_args=["--verify-every", "5"])  # fmt: skip
    try:
        pair.wait_checkpoints(tmp_path / "a.sock", 52, timeout=120)
        assert_same_state(pair, at_least=8)  # RAM, every vCPU register set, devices
        a = pair.colo("a")
        assert a["state"] == "colo" and not a["failovers"]
        assert all(r["dirty_pages"] > 0 for r in a["recent"])
        assert not any("FAIL" in line for line in pair.primary.lines + pair.secondary.lines)
    finally:
        pair.close()


def progress_mark(pair: ColoPair) -> int:
    """A pass number that every later checkpoint's state has reached."""
    mark = max(passes(pair.primary.lines), default=0)
    pair.wait_checkpoints(pair.tmp / "a.sock", pair.colo("a")["checkpoints"] + 2)
    return mark


def check_survivor(pair: ColoPair, side: str, proc, mark: int, before: int = 0) -> None:
    """`before`: failovers `side`'s status listed before this one."""
    info = pair.wait_failover(side, timeout=5, before=before)
    assert info["state"] in ("alone", "active")
    start = len(proc.lines)
    m = proc.wait_line(r"dirty: pass=(\d+) ok", start=start, timeout=30)
    proc.wait_line(r"dirty: pass=(\d+) ok", start=start + 1, timeout=30)  # and it keeps going
    assert int(m.group(1)) >= mark  # never back before the last completed checkpoint
    assert not any("FAIL" in line for line in proc.lines)
    assert proc.proc.poll() is None


@pytest.mark.parametrize("victim", ["primary", "secondary"])
@pytest.mark.parametrize("when", ["between", "mid-transfer"])
@pytest.mark.parametrize("how", ["sigkill", "link-cut"])
def test_failover_matrix(images, tmp_path, victim, when, how):
    stall = {"KVMCOLO_TEST_HOOKS": "stall-transfer-ms:600"} if when == "mid-transfer" else None
    pair = ColoPair(tmp_path, VM, DIRTY, primary_env=stall)
    try:
        mark = progress_mark(pair)
        pair.wait_phase("a", "sending-stalled" if when == "mid-transfer" else "idle")
        t0 = time.monotonic()
        if how == "sigkill":
            (pair.primary if victim == "primary" else pair.secondary).proc.kill()
        else:
            pair.cut_link()
        survivors = [("b", pair.secondary)] if victim == "primary" else [("a", pair.primary)]
        if how == "link-cut":  # both sides lose the other: each goes on alone
            survivors = [("a", pair.primary), ("b", pair.secondary)]
        for side, proc in survivors:
            check_survivor(pair, side, proc, mark)
        assert time.monotonic() - t0 < 10
    finally:
        pair.close()


class TamperingProxy:
    """Forwards primary -> secondary on hostB; after `arm()`, damages the next
    large chunk (a checkpoint payload): flip one byte, or cut the stream."""

    def __init__(self, pair: ColoPair, listen_port: int, mode: str):
        self.mode = mode
        self.armed = threading.Event()
        self.done = threading.Event()
        with pair.b.entered():
            self.server = socket.create_server((ADDR_B, listen_port))
            self.pair_ns = pair.b
        threading.Thread(target=self._serve, daemon=True).start()

    def arm(self) -> None:
        self.armed.set()

    def _serve(self) -> None:
        client, _ = self.server.accept()
        with self.pair_ns.entered():
            upstream = socket.create_connection((ADDR_B, PORT))
        threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()
        self._pump(client, upstream, True)

    def _pump(self, src: socket.socket, dst: socket.socket, tamper: bool) -> None:
        try:
            while data := src.recv(65536):
                if tamper and self.armed.is_set() and not self.done.is_set() and len(data) > 8192:
                    self.done.set()
                    if self.mode == "corrupt":
                        data = bytearray(data)
                        data[len(data) // 2] ^= 0x55
                    else:
                        dst.sendall(data[: len(data) // 2])
                        dst.close()
                        src.close()
                        return
                dst.sendall(data)
        except OSError:
            pass


@pytest.mark.parametrize("mode", ["corrupt", "truncate"])
def test_damaged_checkpoint_is_rejected_whole(images, tmp_path, mode):
    pair = ColoPair(tmp_path, VM, DIRTY, start=False)
    try:
        pair.start_secondary(VM)
        proxy = TamperingProxy(pair, PORT + 1, mode)
        pair.start_primary(VM, DIRTY, port=PORT + 1)
        mark = progress_mark(pair)
        proxy.arm()
        assert proxy.done.wait(10)
        check_survivor(pair, "b", pair.secondary, mark)  # consistent: its invariants hold, progress kept
        if mode == "corrupt":
            assert any("rejected" in line and "authentication" in line for line in pair.secondary.stderr_lines)
    finally:
        pair.close()


def test_peer_without_the_key_is_refused(images, tmp_path):
    pair = ColoPair(tmp_path, VM, DIRTY, start=False)
    try:
        pair.start_secondary(VM)
        wrong = tmp_path / "wrong.key"
        wrong.write_bytes(b"not-the-right-key-at-all")
        intruder = pair.start_primary(VM, DIRTY, key=wrong, wait=False)
        assert intruder.proc.wait(30) == 2
        assert any("does not know the shared key" in line for line in intruder.stderr_lines)
        wait_until(lambda: any("refused" in line for line in pair.secondary.stderr_lines), "the refusal logged")
        assert pair.secondary.proc.poll() is None  # still waiting, nothing applied
        pair.start_primary(VM, DIRTY)  # the real primary still gets in
        pair.wait_checkpoints(tmp_path / "a.sock", 3)
    finally:
        pair.close()


@pytest.mark.parametrize("secondary_vm, says", [(["--image", "dirty", "--mem", "128M"], "RAM differ"),
                                                (VM + ["--cpu", "host,-pv-eoi"], "CPU models differ")],
                         ids=["ram", "cpu-model"])  # fmt: skip
def test_mismatched_vm_options_are_refused_on_both_sides(images, tmp_path, secondary_vm, says):
    pair = ColoPair(tmp_path, VM, DIRTY, start=False)
    try:
        pair.start_secondary(secondary_vm)
        primary = pair.start_primary(VM, DIRTY, wait=False)
        assert primary.proc.wait(30) == 2
        assert pair.secondary.proc.wait(30) == 2
        for proc in (primary, pair.secondary):
            assert any(says in line for line in proc.stderr_lines), proc.stderr_lines
            assert not any("Traceback" in line for line in proc.stderr_lines)
    finally:
        pair.close()


def test_manual_failover_and_status(images, tmp_path):
    pair = ColoPair(tmp_path, VM, DIRTY)
    try:
        from conftest import kvmcolo_cmd

        status = kvmcolo_cmd("status", "--control", str(tmp_path / "a.sock"))
        assert "COLO primary: colo (protected)" in status.stdout and "pause ms" in status.stdout
        assert kvmcolo_cmd("checkpoint", "--control", str(tmp_path / "a.sock")).returncode == 0
        wait_until(lambda: pair.colo("a")["reasons"].get("requested on the control socket", 0) >= 1,
                   "the requested checkpoint")  # fmt: skip
        assert kvmcolo_cmd("failover", "--control", str(tmp_path / "b.sock")).returncode == 0
        check_survivor(pair, "b", pair.secondary, 0)
        pair.wait_failover("a")  # the primary sees the secondary go and carries on too
        assert pair.primary.proc.poll() is None
    finally:
        pair.close()


def test_fpu_registers_survive_100_checkpoints_and_failover(images, tmp_path):
    """x87, SSE and MXCSR values the guest keeps are exact on the SVM after
    every checkpoint load (it checks them between checkpoints too) and after
    taking over."""
    pair = ColoPair(tmp_path, ["--image", "fpregs", "--mem", "64M"], ["report=200"],
                    primary_args=["--checkpoint-delay", "50", "--verify-every", "10"],
                    secondary_args=["--verify-every", "10"])  # fmt: skip
    try:
        pair.wait_checkpoints(tmp_path / "a.sock", 105, timeout=180)
        assert_same_state(pair, at_least=5)
        pair.primary.proc.kill()
        pair.wait_failover("b")
        start = len(pair.secondary.lines)
        pair.secondary.wait_line(r"fpregs: pass=\d+ ok", start=start, timeout=30)
        pair.secondary.wait_line(r"fpregs: pass=\d+ ok", start=start + 1, timeout=30)
        assert not any("FAIL" in line for line in pair.primary.lines + pair.secondary.lines)
    finally:
        pair.close()
