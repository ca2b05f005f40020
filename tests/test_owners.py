"""The single owners added for issue 11, tested directly: dirty-page readers
on a real VM, the RAM cache's checks, guarded threads, test hooks, the
typed checkpoint and the status that only its owner changes."""

from __future__ import annotations

import threading

import pytest

from kvmcolo import testhooks
from kvmcolo.colo_session import Checkpoint, ColoStatus
from kvmcolo.threads import Periodic, guarded


# ---- dirty pages: readers never steal from each other --------------------------------


def test_two_readers_each_see_every_page(images):
    from kvmcolo import dirty_log
    from kvmcolo.console_buffer import ConsoleBuffer
    from kvmcolo.machine import Machine, MachineConfig

    sink = ConsoleBuffer()
    m = Machine(MachineConfig(kernel=str(images / "dirty.elf"), cmdline="pages=64 report=1 rate=100",
                              mem_size=64 << 20, serial_output=sink))  # fmt: skip
    try:
        log = dirty_log.of(m)
        assert dirty_log.of(m) is log  # one per machine
        colo, snap = log.reader("colo"), log.reader("snapshot")
        assert log.reader("colo") is colo
        with m.held("checkpoint"):
            first = sum(d.count for d in colo.collect())
        assert first == (64 << 20) // 4096  # a reader's first collect: every page
        m.start()
        sink.wait_for(r"dirty: pass=2 ok")
        with m.held("checkpoint"):
            snap.collect()  # the snapshot reader empties its own set ...
            m.vm.memory.write(0x900000, b"x" * 4096)  # ... and a VMM write lands after it
            pages = {p for d in colo.collect() for p in d.page_list()}
            later = {p for d in snap.collect() for p in d.page_list()}
        assert len(pages) >= 64  # the working set, although the other reader collected in between
        assert 0x900000 // 4096 in pages and 0x900000 // 4096 in later
        with m.held("checkpoint"):
            assert 0x900000 // 4096 not in {p for d in colo.collect() for p in d.page_list()}  # cleared once read
    finally:
        m.close()


# ---- the RAM cache refuses a checkpoint that does not fit, before writing anything ------


def test_ram_cache_checks_every_region_first(images):
    from kvmcolo import dirty_log, vmstate
    from kvmcolo.machine import Machine, MachineConfig
    from kvmcolo.ram_cache import RamCache

    m = Machine(MachineConfig(kernel=str(images / "hello.elf"), mem_size=16 << 20))
    cache = RamCache(16 << 20)
    try:
        host = vmstate.HostCaps.probe(m.kvm, m.vm.vcpus[0])
        with m.held("checkpoint"):
            cap = vmstate.capture(m, dirty_log.of(m).reader("colo"), vmstate.KIND_FULL, None, host)
            from kvmcolo import sections

            snap = vmstate.parse(b"".join(bytes(p) for p in sections.encode(cap.sections)))
            cache.adopt_initial(snap)
            bad = vmstate.Snapshot(snap.meta, snap.vm, snap.vcpus, snap.devices,
                                   [snap.ram[0]._replace(slot=99)])  # fmt: skip
            before = bytes(cache.memory.regions[0].view[:4096 * 16])
            with pytest.raises(vmstate.IncompatibleState):
                cache.load(bad, dirty_log.of(m).reader("colo").collect())
            assert bytes(cache.memory.regions[0].view[:4096 * 16]) == before
    finally:
        cache.close()
        m.close()


# ---- guarded threads ------------------------------------------------------------------


def test_guarded_thread_hands_its_exception_on_once():
    seen = []
    done = threading.Event()

    def boom():
        raise KeyError("bug")

    def on_error(name, exc):
        seen.append((name, type(exc)))
        done.set()

    guarded("t", boom, on_error).join(5)
    assert done.is_set() and seen == [("t", KeyError)]


def test_periodic_stops_calling_after_an_error():
    calls = []
    errors = []
    failed = threading.Event()

    def tick():
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("third")

    def on_error(name, exc):
        errors.append(name)
        failed.set()

    p = Periodic("tick", 0.001, tick, on_error)
    p.start()
    assert failed.wait(5)
    n = len(calls)
    p.stop()
    assert n == 3 and errors == ["tick"]


# ---- test hooks ---------------------------------------------------------------------------


def test_hook_spec_parsing():
    assert testhooks._parse("colo-recv:3, crash:disk-apply,heartbeat, stall-transfer-ms:600") == {
        "colo-recv": 3, "crash:disk-apply": 1, "heartbeat": 1, "stall-transfer-ms": 600}  # fmt: skip


def test_hook_fires_on_the_nth_pass(monkeypatch):
    monkeypatch.setattr(testhooks, "_armed", {"p": 2})
    testhooks.hit("p")
    with pytest.raises(testhooks.InjectedFault):
        testhooks.hit("p")
    testhooks.hit("p")  # once only
    testhooks.hit("unarmed")


# ---- the typed checkpoint and the status -------------------------------------------------


def test_checkpoint_record_times():
    cp = Checkpoint(7, "timer", size=100, pages=3)
    cp.times.update(start=0.0, paused=1.0, resumed=1.002, sent=1.003, received=1.010)
    r = cp.record("primary")  # marks "done" now: far later than these fixed times
    assert (r.seq, r.reason, r.bytes, r.dirty_pages) == (7, "timer", 100, 3)
    assert abs(r.pause_ms - 2.0) < 1e-6 and abs(r.transfer_ms - 7.0) < 1e-6 and r.load_ms > 0
    svm = Checkpoint(8, "checkpoint")
    svm.times.update(paused=1.0, received=1.005)
    r = svm.record("secondary")
    assert abs(r.transfer_ms - 5.0) < 1e-6 and r.pause_ms > r.transfer_ms


def test_status_changes_only_through_set():
    st = ColoStatus("primary")
    st.set(state="colo", phase="idle")
    assert st.protected() and st.as_dict()["protected"]
    with pytest.raises(AttributeError):
        st.set(checkpoints=5)
    st.set(state="alone")
    assert not st.protected()
