"""Protecting a network service that already runs, under a client: netsrv
as a lone `kvmcolo run` guest on the lab's host A serves one long TCP
connection; `kvmcolo protect` makes host B its secondary live; then host A
dies and host B goes on.  The client's one connection sees one unbroken
counter sequence throughout — before, during and after the pre-copy, and
across the failover."""

from __future__ import annotations

import signal

import pytest

from conftest import require_device, wait_until
from kvmcolo import control, lab
from test_colo_net import assert_on_disk, log_disks
from vmm_process import GuestProcess


@pytest.fixture
def the_lab(images, tmp_path):
    """(the lab, its ColoLab with no VMM started yet); everything ends after the test."""
    the_lab = lab.Lab()
    pair = lab.ColoLab(the_lab, str(tmp_path), lambda side, argv: GuestProcess(argv))
    yield the_lab, pair
    pair.stop()
    the_lab.close()


def serving_alone_and_waiting(pair: lab.ColoLab, role: str = "secondary") -> GuestProcess:
    """netsrv running alone on host A (`kvmcolo run`), host B's VMM waiting as `role`."""
    guest = pair.start_alone()
    guest.wait_line(r"netsrv: ready", timeout=60)
    pair.start("B", role=role)
    pair.wait_control("B")
    return guest


def test_protect_a_serving_guest_under_a_client_then_fail_over(the_lab):
    the_lab, pair = the_lab
    a = serving_alone_and_waiting(pair)
    with lab.CounterClient(the_lab.client) as client:
        client.start(rate=100)
        wait_until(lambda: len(client.values()) >= 50 or client.error, "replies from the lone guest")
        done = pair.protect(["--max-downtime", "100"])
        assert done.returncode == 0, done.stderr + "\n".join(a.stderr_lines[-20:])
        colo = control.call(pair.sock("A"), "query-colo")
        assert colo["state"] == "colo" and colo["net"] is not None, colo
        wait_until(lambda: control.call(pair.sock("A"), "query-colo")["checkpoints"] >= 10, "checkpoints")
        protected_at = len(client.values())
        wait_until(lambda: len(client.values()) >= protected_at + 50 or client.error, "replies under COLO")
        a.proc.send_signal(signal.SIGKILL)  # host A dies; B takes over with the client's connection
        a.proc.wait(10)
        wait_until(lambda: control.call(pair.sock("B"), "query-colo")["failovers"], "the failover", timeout=10)
        after = len(client.values())
        wait_until(lambda: len(client.values()) >= after + 50 or client.error, "replies from the survivor")
        client.stop()
        assert client.error is None, client.error
        assert client.check_sequence() == [], client.check_sequence()[:5]  # no gap, no duplicate
    protection = colo["protections"][0]
    assert protection["downtime_ms"] is not None and protection["rounds"] >= 1


def test_the_pair_heals_itself_through_five_host_failures_on_one_connection(the_lab, tmp_path):
    """The healing soak: netsrv under a client on one TCP connection,
    journaling every counter value to its disk before replying; each side
    has --standby naming the other host.  Five times: SIGKILL the primary's
    VMM, the survivor takes over, a new secondary starts on the dead host
    (its disk image stale: only differing chunks travel), and the survivor
    protects the guest with it by itself.  At the end every value the
    client was told is on the last survivor's disk."""
    require_device("/dev/fuse", "FUSE")
    the_lab, pair = the_lab
    images = log_disks(tmp_path)
    standby = {s: ["--standby", f"{lab.other_addr(s)}:{lab.REPL_PORT}", "--disk", str(images[s.lower()]),
                   "--overlay-dir", str(tmp_path / f"ovl-{s}")] for s in "AB"}  # fmt: skip

    def colo(side: str) -> dict:
        return control.call(pair.sock(side), "query-colo")

    def logs() -> str:
        return "\n".join(f"[{s}] {line}" for s, p in pair.procs.items() for line in p.stderr_lines[-25:])

    pair.start("B", standby["B"])
    pair.wait_control("B")
    pair.start("A", standby["A"], guest_args=["log=1"]).wait_line(r"netsrv: ready", timeout=60)
    pair.wait_colo()
    primary = "A"
    with lab.CounterClient(the_lab.client) as client:
        client.start(rate=100)
        wait_until(lambda: len(client.values()) >= 30 or client.error, "replies")
        for cycle in range(1, 6):
            survivor = "B" if primary == "A" else "A"
            victim = pair.procs[primary]
            victim.proc.send_signal(signal.SIGKILL)
            victim.proc.wait(10)
            try:
                wait_until(lambda: len(colo(survivor)["failovers"]) == cycle, f"cycle {cycle}: the takeover")
                pair.start(primary, standby[primary], role="secondary")  # the dead host comes back
                pair.wait_control(primary)
                wait_until(lambda: colo(survivor)["state"] == "colo" and colo(survivor)["checkpoints"] >= 3,
                           f"cycle {cycle}: re-protected by itself", timeout=60)  # fmt: skip
            except AssertionError as e:
                raise AssertionError(f"{e}\n{logs()}") from None
            n = len(client.values())
            wait_until(lambda: len(client.values()) >= n + 30 or client.error, f"cycle {cycle}: replies")
            assert client.error is None, f"cycle {cycle}: {client.error}"
            primary = survivor
        client.stop()
        assert client.error is None, client.error
        assert client.check_sequence() == [], client.check_sequence()[:5]  # one sequence: no gap, no duplicate
    history = colo(primary)
    assert len(history["failovers"]) == 5, history["failovers"]
    assert len(history["protections"]) == 6, history["protections"]  # the first, then five re-protections
    control.call(pair.sock(primary), "quit")
    assert pair.procs[primary].proc.wait(20) == 0, logs()
    assert_on_disk(images[primary.lower()], client.values())


def test_migrate_a_serving_guest_under_a_client(the_lab):
    """Live migration of netsrv from host A (a lone `kvmcolo run`) to host B
    (`boot --incoming`) while the client talks to it: no gap, no duplicate,
    no reset; the source ends with status 0; the guest runs on host B."""
    the_lab, pair = the_lab
    source = serving_alone_and_waiting(pair, role="incoming")
    with lab.CounterClient(the_lab.client) as client:
        client.start(rate=100)
        wait_until(lambda: len(client.values()) >= 50 or client.error, "replies from host A")
        done = pair.protect(command="migrate")
        assert done.returncode == 0, done.stderr + "\n".join(source.stderr_lines[-20:])
        assert "migrated to" in done.stdout
        assert source.proc.wait(10) == 0 and any("migrated to" in x for x in source.stderr_lines)
        b = control.call(pair.sock("B"), "query-colo")
        assert b["state"] == "active" and len(b["migrations"]) == 1, b
        moved = len(client.values())
        wait_until(lambda: len(client.values()) >= moved + 50 or client.error, "replies from host B")
        client.stop()
        assert client.error is None, client.error
        assert client.check_sequence() == [], client.check_sequence()[:5]


def test_migrate_to_a_colo_secondary_is_refused_and_the_guest_runs_on(the_lab):
    the_lab, pair = the_lab
    source = serving_alone_and_waiting(pair)  # a COLO secondary, not --incoming
    done = pair.protect(command="migrate")
    assert done.returncode == 1 and "boot --incoming" in done.stderr, done.stderr
    assert len([x for x in done.stderr.splitlines() if x.strip()]) == 1
    assert source.proc.poll() is None and control.call(pair.sock("A"), "query-status")["holds"] == {}
    assert pair.procs["B"].proc.poll() is None  # the secondary waits on for its primary
