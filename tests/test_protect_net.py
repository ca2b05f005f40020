"""Protecting a network service that already runs, under a client: netsrv
as a lone `kvmcolo run` guest on the lab's host A serves one long TCP
connection; `kvmcolo protect` makes host B its secondary live; then host A
dies and host B goes on.  The client's one connection sees one unbroken
counter sequence throughout — before, during and after the pre-copy, and
across the failover."""

from __future__ import annotations

import signal

from conftest import wait_until
from kvmcolo import control, lab
from vmm_process import GuestProcess


def test_protect_a_serving_guest_under_a_client_then_fail_over(images, tmp_path):
    the_lab = lab.Lab()
    pair = lab.ColoLab(the_lab, str(tmp_path), lambda side, argv: GuestProcess(argv))
    try:
        a = pair.start_alone()
        a.wait_line(r"netsrv: ready", timeout=60)
        pair.start("B")
        pair.wait_control("B")
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
    finally:
        pair.stop()
        the_lab.close()
