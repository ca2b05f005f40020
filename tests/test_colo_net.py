"""Network COLO end to end: the lab's LAN (client, hostA, hostB namespaces
on a bridge, plus a replication link), `netsrv` under COLO as two real
`kvmcolo boot` processes, real clients.  Every reply the client sees is
checked; failovers must leave the client's TCP session intact — no
reconnect, no gap, no duplicate."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from conftest import kvmcolo_cmd, require_device
from kvmcolo import control, lab
from kvmcolo.errors import UserError
from vmm_process import GuestProcess


class LabPair:
    """The lab with the secondary on hostB and the primary on hostA
    (lab.ColoLab, console lines captured by GuestProcess)."""

    def __init__(self, tmp_path, guest_args=(), primary=(), secondary=(), primary_env=None):
        self.tmp = tmp_path
        self.lab = lab.Lab()
        self.colo_lab: lab.ColoLab | None = None
        self.a = self.b = None
        try:
            self.colo_lab = lab.ColoLab(self.lab, str(tmp_path),
                                        lambda side, argv: GuestProcess(argv, primary_env if side == "A" else None))
            self.b = self.colo_lab.start("B", secondary)
            self.colo_lab.wait_control("B")
            self.a = self.colo_lab.start("A", primary, guest_args)
            self.a.wait_line(r"netsrv: ready", timeout=60)
            self.colo_lab.wait_colo()
        except BaseException:
            self.close()
            raise

    def sock(self, side: str) -> str:
        return self.colo_lab.sock(side)

    def colo(self, side: str) -> dict:
        return control.call(self.sock(side), "query-colo")

    def wait(self, condition, what: str, timeout: float = 30, proc: GuestProcess | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if condition():
                    return
            except (OSError, UserError):
                pass
            for p in (proc, self.a, self.b):
                if p is not None and p.proc.poll() is not None and p is not getattr(self, "_killed", None):
                    raise AssertionError(f"a VMM exited while waiting for {what}:\n" + "\n".join(p.stderr_lines[-15:]))
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def client(self) -> lab.CounterClient:
        return lab.CounterClient(self.lab.client)

    def kill(self, side: str) -> None:
        proc = self.a if side == "a" else self.b
        self._killed = proc
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait(10)

    def close(self) -> None:
        if self.colo_lab is not None:
            self.colo_lab.stop()
        self.lab.close()


@pytest.fixture
def pair_factory(images, tmp_path):
    made = []

    def make(**kw) -> LabPair:
        made.append(LabPair(tmp_path, **kw))
        return made[-1]

    yield make
    for p in made:
        p.close()


def net_reasons(info: dict) -> dict:
    return {r: n for r, n in info["reasons"].items() if r.startswith("net-")}


def test_services_under_colo_with_python_curl_nc_and_ping(pair_factory):
    pair = pair_factory()
    with pair.client() as c:
        values = [c.request() for _ in range(300)]
    assert lab.check_sequence(values) == [] and values[0] >= 1
    ns = pair.lab.client
    http = ns.run("curl", "-sS", "--max-time", "10", f"http://{lab.GUEST_ADDR}/counter")
    assert http.returncode == 0 and re.fullmatch(r"\d+\n", http.stdout), http
    assert int(http.stdout) == values[-1] + 1
    echo = ns.run("sh", "-c", f"printf 'hello colo\\n' | nc -N -w 5 {lab.GUEST_ADDR} 7")
    assert echo.stdout == "hello colo\n", echo
    lines = ns.run("sh", "-c", f"printf 'a\\nb\\n' | nc -N -w 5 {lab.GUEST_ADDR} {lab.COUNTER_PORT}")
    assert lines.stdout.split() == [str(values[-1] + 2), str(values[-1] + 3)], lines
    with pair.lab.client.entered():
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.settimeout(5)
    for i in range(20):
        udp.sendto(b"datagram %d" % i, (lab.GUEST_ADDR, 7))
        assert udp.recvfrom(2048)[0] == b"datagram %d" % i
    udp.close()
    ping = ns.run("ping", "-c", "5", "-i", "0.2", "-W", "2", lab.GUEST_ADDR)
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout
    a = pair.colo("a")
    assert net_reasons(a) == {}, a["reasons"]  # identical guests: the comparator never asked for a checkpoint
    nic = a["net"]["nics"][0]
    assert nic["matched"] >= 300 + 20 and nic["passthrough"] >= 1 and nic["held"] == 0
    assert a["state"] == "colo" and not a["failovers"]
    for side, words in (("a", ["net 0: matched", "output held p50"]), ("b", ["net 0: delivered", "guest 10.77.0.2"])):
        status = kvmcolo_cmd("status", "--control", pair.sock(side))
        assert status.returncode == 0 and all(w in status.stdout for w in words), status.stdout


def test_rewriter_connection_with_different_isns_runs_thousands_of_requests_without_mismatch(pair_factory):
    # Checkpoints far apart: the whole connection lives between two of them,
    # so the PVM's and SVM's ISNs (RDRAND) differ for all of it.
    pair = pair_factory(primary=["--checkpoint-delay", "60000"])
    before = pair.colo("a")["checkpoints"]
    with pair.client() as c:
        values = [c.request() for _ in range(3000)]
    assert lab.check_sequence(values) == []
    a, b = pair.colo("a"), pair.colo("b")
    assert net_reasons(a) == {}, a["reasons"]
    assert a["checkpoints"] == before, "a checkpoint happened: the connection did not run on two sequence spaces"
    rewriter = b["net"]["nics"][0]["rewriter"]
    assert rewriter["learned"] >= 1 and rewriter["rewritten_out"] >= 3000 and rewriter["rewritten_in"] >= 3000


_DIVERGE_REPLY = re.compile(rb"^(\d+)( [0-9a-f]{16})?\n$")


def test_divergent_replies_force_checkpoints_and_the_client_sees_one_version(pair_factory):
    pair = pair_factory(guest_args=["diverge=10"])
    with pair.lab.client.entered():
        s = socket.create_connection((lab.GUEST_ADDR, lab.COUNTER_PORT), timeout=20)
    buf = b""
    values = []
    try:
        for _ in range(100):
            s.sendall(b"\n")
            while b"\n" not in buf:
                chunk = s.recv(256)
                assert chunk, "connection closed"
                buf += chunk
            line, buf = buf.split(b"\n", 1)
            m = _DIVERGE_REPLY.match(line + b"\n")
            assert m, f"a reply that is no single version: {line!r}"
            n = int(m.group(1))
            assert bool(m.group(2)) == (n % 10 == 0), line  # the random suffix exactly where the guest adds it
            values.append(n)
    finally:
        s.close()
    assert lab.check_sequence(values) == []
    divergent = sum(1 for n in values if n % 10 == 0)
    a = pair.colo("a")
    assert a["reasons"].get("net-mismatch tcp", 0) >= divergent // 2, a["reasons"]
    assert a["net"]["nics"][0]["mismatch_tcp"] >= divergent // 2
    assert a["state"] == "colo"


def run_through_failover(pair: LabPair, kill, survivor: str, after_s: float = 4.0) -> dict:
    """A long counter session; `kill()` mid-stream; the session must go on."""
    with pair.client() as c:
        c.start(200)
        pair.wait(lambda: len(c.records) >= 300, "300 replies before the failure")
        t_fail = time.monotonic()
        kill()
        pair.wait(lambda: pair.colo(survivor)["failovers"], f"{survivor} to notice", timeout=15)
        pair.wait(lambda: sum(1 for t, _, _ in c.records if t > t_fail) >= 200, "200 replies after the failure",
                  timeout=30)  # fmt: skip
        n = len(c.records)
        pair.wait(lambda: len(c.records) >= n + 50 * after_s, "replies keep coming")
        c.stop()
        assert c.error is None, c.error  # never reset, never reconnected
        assert lab.check_sequence(c.values()) == []  # no gap, no duplicate
        gap, _ = c.longest_gap()
    info = pair.colo(survivor)
    info["longest_gap_s"] = gap
    info["values"] = c.values()
    return info


@pytest.mark.parametrize("notify", [[], ["--no-ioeventfd"]], ids=["ioeventfd", "mmio-exit"])
def test_failover_primary_killed_mid_stream(pair_factory, notify):
    # mmio-exit: queue notifications come as MMIO exits on the vCPU threads;
    # the machine serves them on the I/O thread, where the ports' sends belong.
    pair = pair_factory(primary=notify, secondary=notify)
    info = run_through_failover(pair, lambda: pair.kill("a"), "b")
    assert info["state"] == "active"
    assert info["net"]["active"] and info["net"]["nics"][0]["guest_ip"] == lab.GUEST_ADDR


LOG_SECTORS = 2048  # a 1 MiB disk: netsrv's log=1 keeps counter n in sector n % 2048


@pytest.mark.parametrize("resume_early", [True, False], ids=["resume-early", "no-resume-early"])
def test_disk_and_nic_together_every_reply_is_on_the_survivors_disk(pair_factory, tmp_path, resume_early):
    """netsrv journals each counter value to its disk before replying; under
    COLO with a disk and a NIC, the primary is killed mid-session: the client
    sees no gap, and every value it was told is on the survivor's disk."""
    require_device("/dev/fuse", "FUSE")
    images = log_disks(tmp_path)
    early = [] if resume_early else ["--no-resume-early"]
    pair = pair_factory(guest_args=["log=1"], primary=["--disk", str(images["a"]), *early],
                        secondary=["--disk", str(images["b"]), "--overlay-dir", str(tmp_path / "ovl")])  # fmt: skip
    info = run_through_failover(pair, lambda: pair.kill("a"), "b")
    assert info["state"] == "active"
    control.call(pair.sock("b"), "quit")
    assert pair.b.proc.wait(20) == 0
    assert_on_disk(images["b"], info["values"])
    assert not any("FAIL" in line for line in pair.b.lines)


def log_disks(tmp_path) -> dict:
    images = {}
    for side in "ab":
        images[side] = tmp_path / f"{side}.img"
        images[side].write_bytes(bytes(LOG_SECTORS * 512))
    return images


def assert_on_disk(image, values) -> None:
    """Every counter value the client was told is journaled on `image`."""
    disk = image.read_bytes()
    for v in values[-LOG_SECTORS:]:
        sector = disk[(v % LOG_SECTORS) * 512 :][:512]
        m = re.match(rb"netsrv counter=(\d+)\n", sector)
        assert m, f"value {v}: sector {v % LOG_SECTORS} holds {sector[:32]!r}"
        held = int(m.group(1))
        assert held >= v and held % LOG_SECTORS == v % LOG_SECTORS, (v, held)


def test_switchover_and_back_under_a_client_with_a_disk(pair_factory, tmp_path):
    """Planned role swaps under a client on one TCP connection, netsrv
    journaling every value to its disk before replying: `kvmcolo
    switchover` on A makes B the primary and A its secondary with nothing
    copied, checkpoints then go B -> A with state verified equal (RAM,
    devices, disks); then back.  Then the primary dies: no gap, no
    duplicate, no reset, and every value the client saw is on the
    survivor's disk."""
    require_device("/dev/fuse", "FUSE")
    images = log_disks(tmp_path)
    verify = ["--verify-every", "2"]
    pair = pair_factory(guest_args=["log=1"], primary=["--disk", str(images["a"]), *verify,
                                                       "--overlay-dir", str(tmp_path / "ovl-a")],
                        secondary=["--disk", str(images["b"]), *verify, "--overlay-dir", str(tmp_path / "ovl-b")])  # fmt: skip

    def logs() -> str:
        return "\n".join(f"[{side}] {line}" for side, p in (("A", pair.a), ("B", pair.b))
                         for line in p.stderr_lines[-20:])  # fmt: skip

    with pair.client() as c:
        c.start(200)
        pair.wait(lambda: len(c.records) >= 100, "replies before the switchover")
        for old, new in (("a", "b"), ("b", "a")):
            done = kvmcolo_cmd("switchover", "--control", pair.sock(old), timeout=90)
            assert done.returncode == 0, done.stderr + logs()
            assert done.stdout.startswith("switched over:"), done.stdout
            pair.wait(lambda: pair.colo(new)["checkpoints"] >= 8, f"checkpoints from the new primary {new}")
            primary, secondary = pair.colo(new), pair.colo(old)
            assert (primary["role"], primary["state"], secondary["role"], secondary["state"]) == \
                ("primary", "colo", "secondary", "colo"), (primary, secondary)  # fmt: skip
            common = set(primary["hashes"]) & set(secondary["hashes"])
            assert common, (primary["hashes"].keys(), secondary["hashes"].keys())
            for seq in common:
                differ = sorted(k for k, v in primary["hashes"][seq].items() if secondary["hashes"][seq].get(k) != v)
                assert not differ, f"after the switchover to {new}, checkpoint {seq} differs in {differ}"
            assert primary["switchovers"] and primary["switchovers"] == secondary["switchovers"]
            assert control.call(pair.sock(old), "query-status")["holds"].get("switchover") is None
            n = len(c.records)
            pair.wait(lambda: len(c.records) >= n + 100, f"replies with {new} the primary")
        assert len(pair.colo("a")["switchovers"]) == 2
        pair.kill("a")
        pair.wait(lambda: pair.colo("b")["failovers"], "the takeover", timeout=15)
        n = len(c.records)
        pair.wait(lambda: len(c.records) >= n + 100, "replies from the survivor")
        c.stop()
        assert c.error is None, c.error  # never reset, never reconnected
        assert lab.check_sequence(c.values()) == [], lab.check_sequence(c.values())[:5]
        values = c.values()
    control.call(pair.sock("b"), "quit")
    assert pair.b.proc.wait(20) == 0, logs()
    assert_on_disk(images["b"], values)
    assert not any("FAIL" in line for line in pair.a.lines + pair.b.lines)


def test_internal_error_in_the_comparator_ticker_ends_protection_not_the_session(pair_factory):
    """A bug in the primary's network thread: the primary goes on alone (held
    output released), the secondary is told to end, the client notices nothing."""
    pair = pair_factory(primary_env={"KVMCOLO_TEST_HOOKS": "colo-net-tick:300"})
    with pair.client() as c:
        c.start(200)
        pair.wait(lambda: pair.colo("a")["internal_errors"], "the injected fault", timeout=30)
        pair._killed = pair.b  # it is told to end
        assert pair.b.proc.wait(15) == 4
        n = len(c.records)
        pair.wait(lambda: len(c.records) >= n + 100, "replies from the primary alone")
        c.stop()
        assert c.error is None, c.error
        assert lab.check_sequence(c.values()) == []
    info = pair.colo("a")
    assert info["state"] == "alone" and not info["protected"] and "colo-net-tick" in info["internal_errors"][0]


def test_failover_secondary_killed_mid_stream(pair_factory):
    pair = pair_factory()
    info = run_through_failover(pair, lambda: pair.kill("b"), "a")
    assert info["state"] == "alone" and info["net"]["mirroring"] is False
    assert info["net"]["nics"][0]["held"] == 0


def test_failover_replication_link_cut_with_fencing(pair_factory, tmp_path):
    """A cut link looks like a dead peer to both sides.  The secondary's fence
    command kills the primary (STONITH); the primary's waits longer and then
    refuses, so it never goes on alone — and holds its output meanwhile."""
    pid_file = tmp_path / "a.pid"
    pair = pair_factory(primary=["--fence-command", "sleep 8; exit 1"],
                        secondary=["--fence-command", f"kill -9 $(cat {pid_file})"])  # fmt: skip
    pid_file.write_text(str(pair.a.proc.pid))

    def cut() -> None:
        pair._killed = pair.a  # it will be fenced
        pair.lab.host_a.ip("link", "set", "repA", "down")

    info = run_through_failover(pair, cut, "b")
    assert info["state"] == "active"
    assert pair.a.proc.wait(10) == -signal.SIGKILL  # fenced by the secondary
    assert any("fence command confirmed" in line for line in pair.b.stderr_lines)


def test_failed_fence_stops_the_side_that_lost(pair_factory):
    pair = pair_factory(secondary=["--fence-command", "echo arbiter says no >&2; exit 1"])
    pair._killed = pair.b
    pair.kill("a")
    assert pair.b.proc.wait(15) == 3
    assert any("could not fence the primary" in line for line in pair.b.stderr_lines)


def test_concurrent_connections_and_churn_cause_no_mismatch_on_deterministic_services(pair_factory):
    """Four TCP echo sessions and a stream of short HTTP connections (404s)
    at once, across many checkpoints: the guests' outputs are the same, so
    the comparator must never ask for a checkpoint — whatever the
    interleaving, segmentation, or handshakes cut by a checkpoint."""
    import threading

    pair = pair_factory()
    end = time.monotonic() + 8
    results = {"echo": 0, "echo_bad": [], "http": 0, "http_bad": []}

    def echo(i: int) -> None:
        with pair.lab.client.entered():
            s = socket.create_connection((lab.GUEST_ADDR, 7), timeout=20)
        with s:
            n = 0
            while time.monotonic() < end:
                msg = b"client %d line %d %s\n" % (i, n, os.urandom(6).hex().encode())
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(4096)
                    assert chunk, "echo connection closed"
                    got += chunk
                results["echo"] += 1
                if got != msg:
                    results["echo_bad"].append(got)
                n += 1

    def churn() -> None:
        while time.monotonic() < end:
            r = pair.lab.client.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                                    f"http://{lab.GUEST_ADDR}/nothing")  # fmt: skip
            results["http"] += 1
            if r.stdout != "404":
                results["http_bad"].append(r.stdout + r.stderr)

    threads = [threading.Thread(target=echo, args=(i,)) for i in range(4)] + [threading.Thread(target=churn)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["echo"] > 1000 and results["http"] > 50, results
    assert not results["echo_bad"] and not results["http_bad"], results
    a = pair.colo("a")
    assert a["checkpoints"] > 20
    assert net_reasons(a) == {}, a["reasons"]


def test_concurrent_counter_clients_see_one_consistent_counter(pair_factory):
    """Concurrent clients of one shared counter: the two guests may serve
    them in different orders (real divergence: mismatch checkpoints are
    expected), but the replies that reach the clients come from one guest:
    together they are exactly 1..N, each client's increasing."""
    pair = pair_factory()
    clients = [pair.client() for _ in range(3)]
    try:
        for c in clients:
            c.start(150)
        pair.wait(lambda: all(len(c.records) >= 600 for c in clients) or any(c.error for c in clients),
                  "600 replies to each client", timeout=60)  # fmt: skip
        for c in clients:
            c.stop()
        assert all(c.error is None for c in clients), [c.error for c in clients]
        values = sorted(v for c in clients for v in c.values())
        assert values == list(range(values[0], values[0] + len(values))), "a counter value was lost or repeated"
        assert all(c.values() == sorted(set(c.values())) for c in clients)
        assert len(values) > 500
    finally:
        for c in clients:
            c.close()
