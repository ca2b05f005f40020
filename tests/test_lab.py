"""kvmcolo.lab: the one-machine LAN (client, hostA, hostB, a switch), the
counter client, and the demo's pieces that run without COLO networking."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import REPO, require_device, require_root
from kvmcolo import demo, lab
from kvmcolo.errors import UserError
from kvmcolo.lab import CLIENT_ADDR, GUEST_ADDR, GUEST_MAC, CounterClient, CounterError, Lab, check_sequence
from vmm_process import GuestProcess


def netns_list() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def links(ns) -> dict[str, str]:
    """name -> master (or '') of every interface in a namespace."""
    out = subprocess.run(["ip", "-n", ns.name, "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    result = {}
    for line in out.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        words = line.split()
        result[name] = words[words.index("master") + 1] if "master" in words else ""
    return result


# ---- pure parts ------------------------------------------------------------------------------


def test_check_sequence():
    assert check_sequence([]) == []
    assert check_sequence([7]) == []
    assert check_sequence([1, 2, 3, 4]) == []
    assert check_sequence([5, 6, 8]) == ["gap: reply 3 is 8 after 6 (1 missing)"]
    assert check_sequence([5, 6, 6, 7]) == ["duplicate: reply 3 repeats 6"]
    assert check_sequence([5, 6, 3]) == ["went backwards: reply 3 is 3 after 6"]


def test_boot_args():
    a = lab.boot_args("A", "/k", "/a.sock", extra=["--checkpoint-delay", "50"], guest_args=["diverge=0"],
                      mem="64M", exe=["kvmcolo"])  # fmt: skip
    assert a == ["kvmcolo", "boot", "--primary", "--peer", "192.168.99.2:7777", "--key-file", "/k",
                 "--control", "/a.sock", "--checkpoint-delay", "50", "--image", "netsrv",
                 "--net", "tap=tapA,bridge=brA", "--mem", "64M", "--", "ip=10.77.0.2", "diverge=0"]  # fmt: skip
    b = lab.boot_args("secondary", "/k", "/b.sock", guest_args=["diverge=0"], exe=["kvmcolo"])
    assert b == ["kvmcolo", "boot", "--secondary", "--listen", "192.168.99.2:7777", "--key-file", "/k",
                 "--control", "/b.sock", "--image", "netsrv", "--net", "tap=tapB,bridge=brB",
                 "--", "ip=10.77.0.2"]  # fmt: skip
    with pytest.raises(ValueError):
        lab.boot_args("C", "/k", "/c.sock")


def test_boot_args_parse_with_the_cli():
    """Every flag boot_args uses is one `kvmcolo boot` knows."""
    from kvmcolo import cli

    for side in "AB":
        argv = lab.boot_args(side, "/k", "/s.sock", extra=["--compare-timeout", "500"], exe=[])
        args = cli._build_parser().parse_args(argv)
        assert args.command == "boot" and args.image == "netsrv"
        assert cli.parse_net(args.net[0]).bridge == ("brA" if side == "A" else "brB")


class FakeCounter:
    """A TCP server in this namespace answering each line with scripted replies."""

    def __init__(self, replies: list[bytes], close_after: bool = True):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.accepts = 0
        self.replies = replies
        self.close_after = close_after
        self.release = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            self.accepts += 1
            with conn:
                for reply in self.replies:
                    if not conn.recv(1):
                        return
                    conn.sendall(reply)
                if not self.close_after:
                    self.release.wait(10)


def test_counter_client_rejects_diverged_and_malformed_replies():
    fake = FakeCounter([b"1\n", b"2\n", b"3 00112233deadbeef\n"])
    c = CounterClient(None, "127.0.0.1", fake.port, timeout=5)
    assert c.request() == 1
    assert c.request() == 2
    with pytest.raises(CounterError, match="malformed reply b'3 00112233deadbeef\\\\n' after 2 replies"):
        c.request()
    assert c.last_line == b"3 00112233deadbeef\n"
    assert c.error and not c.ok
    with pytest.raises(CounterError):  # broken for good
        c.request()
    c.close()
    assert fake.accepts == 1


def test_counter_client_never_reconnects():
    fake = FakeCounter([b"41\n", b"42\n"])  # then the server closes the connection
    c = CounterClient(None, "127.0.0.1", fake.port, timeout=5)
    c.start(rate=200)
    c._thread.join(10)
    assert not c.running
    assert c.values() == [41, 42]
    assert c.check_sequence() == []
    assert "closed by the server after 2 replies" in c.error
    assert not c.ok
    c.close()
    assert fake.accepts == 1


def test_counter_client_timeout_is_an_error():
    fake = FakeCounter([b"1\n"], close_after=False)  # answers once, then stays silent
    c = CounterClient(None, "127.0.0.1", fake.port, timeout=0.3)
    assert c.request() == 1
    with pytest.raises(CounterError, match="no reply within 0.3 s after 1 replies"):
        c.request()
    c.close()
    fake.release.set()


def test_counter_client_connect_failure():
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(CounterError, match="cannot connect"):
        CounterClient(None, "127.0.0.1", port)


def test_demo_refuses_without_root_or_kvm(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(UserError, match="as root"):
        demo.check_prerequisites()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(demo, "KVM_DEVICE", "/nonexistent/kvm")
    with pytest.raises(UserError, match="/nonexistent/kvm"):
        demo.check_prerequisites()


def test_demo_arguments():
    args = demo.parse_args(["--short"])
    assert (args.short, args.kill_after, args.run_after) == (True, None, None)
    assert demo.timings(args) == (demo.DEFAULT_RATE, 4, 4)
    assert demo.timings(demo.parse_args([])) == (demo.DEFAULT_RATE, 10, 8)
    assert demo.timings(demo.parse_args(["--short", "--kill-after", "6", "--requests-per-s", "5"])) == (5, 6, 4)
    for bad in (["--kill-after", "0"], ["--requests-per-s", "-1"], ["--run-after", "x"]):
        with pytest.raises(UserError):
            demo.timings(demo.parse_args(bad))


# ---- the lab itself (root) -------------------------------------------------------------------


def test_lab_topology_and_close():
    require_root("network namespaces")
    with Lab() as the_lab:
        names = [ns.name for ns in the_lab.namespaces]
        assert len(names) == 4 and all(str(os.getpid()) in n for n in names)
        assert links(the_lab.lan) == {"lo": "", "lan0": "", "portC": "lan0", "portA": "lan0", "portB": "lan0"}
        assert links(the_lab.client) == {"lo": "", "eth0": ""}
        assert links(the_lab.host_a) == {"lo": "", "brA": "", "lanA": "brA", "repA": ""}
        assert links(the_lab.host_b) == {"lo": "", "brB": "", "lanB": "brB", "repB": ""}
        # The replication link works; the LAN and the replication link are separate.
        r = the_lab.host_a.run("ping", "-c", "1", "-W", "2", lab.REPL_B)
        assert r.returncode == 0, r.stdout + r.stderr
        r = the_lab.client.run("ping", "-c", "1", "-W", "1", lab.REPL_A)
        assert r.returncode != 0
        listed = netns_list()
        assert all(n in listed for n in names)
    listed = netns_list()
    assert not [n for n in names if n in listed]
    the_lab.close()  # again: nothing happens


def test_lab_creation_failure_cleans_up(monkeypatch):
    require_root("network namespaces")
    made = []
    real_init = lab.Namespace.__init__

    def init(self, role):
        real_init(self, role)
        made.append(self.name)

    monkeypatch.setattr(lab.Namespace, "__init__", init)
    monkeypatch.setattr(lab, "REPL_PREFIX", 99)  # `ip addr add 192.168.99.1/99` fails, late in the build
    with pytest.raises(lab.LabError, match=r"building the lab failed: ip -n kvmcolo-hostA-\d+ addr add "
                                           r"192.168.99.1/99 dev repA: .*"):  # fmt: skip
        Lab()
    assert len(made) == 4
    listed = netns_list()
    assert not [n for n in made if n in listed]


@pytest.fixture
def lab_with_netsrv(kvm_device, images):
    """The lab with netsrv running (plain `kvmcolo run`) on host A, its tap
    made by hand and put on brA."""
    require_device("/dev/net/tun", "tun/tap")
    the_lab = Lab()
    vmm = None
    try:
        a = the_lab.host_a
        a.ip("tuntap", "add", "mode", "tap", "name", "tapA")
        a.ip("link", "set", "tapA", "master", "brA", "up")
        vmm = GuestProcess(a.cmd(*lab.kvmcolo_command(), "run", "--image", "netsrv", "--net", "tap=tapA", "--",
                                 f"ip={GUEST_ADDR}"))  # fmt: skip
        ready = vmm.wait_line(r"netsrv: ready ip=(\S+) mac=(\S+)", timeout=60)
        assert ready.groups() == (GUEST_ADDR, GUEST_MAC)
        yield the_lab
    finally:
        if vmm is not None:
            vmm.stop()
        names = [ns.name for ns in the_lab.namespaces]
        the_lab.close()
        listed = netns_list()
        assert not [n for n in names if n in listed]


def test_counter_client_through_the_lan(lab_with_netsrv):
    the_lab = lab_with_netsrv
    with CounterClient(the_lab.client) as c:
        first = c.request()
        values = [first] + [c.request() for _ in range(299)]
        assert values == list(range(first, first + 300))
        c.start(rate=200)
        threading.Event().wait(1.0)
        c.stop()
        assert c.error is None, c.error
        assert c.check_sequence() == []
        assert len(c.records) > 300 + 50
        assert c.latency_p50() < 0.1
        assert c.longest_gap()[0] < 1.0
    r = the_lab.client.run("ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_ADDR)
    assert r.returncode == 0 and "3 received" in r.stdout, r.stdout + r.stderr
    # The guest is reached through the switch and host A's bridge, nowhere else.
    r = the_lab.host_b.run("ping", "-c", "1", "-W", "1", GUEST_ADDR)
    assert r.returncode != 0
    neigh = the_lab.client.run("ip", "neigh", "show", GUEST_ADDR).stdout
    assert GUEST_MAC in neigh and CLIENT_ADDR != GUEST_ADDR


def test_vmm_attaches_its_tap_to_the_bridge(kvm_device, images):
    """`--net tap=tapA,bridge=brA` (a tap the VMM creates and adds to brA), as
    the primary of the demo does it."""
    require_device("/dev/net/tun", "tun/tap")
    with Lab() as the_lab:
        vmm = GuestProcess(the_lab.host_a.cmd(*lab.kvmcolo_command(), "run", "--image", "netsrv", "--net",
                                              "tap=tapA,bridge=brA", "--", f"ip={GUEST_ADDR}"))  # fmt: skip
        try:
            vmm.wait_line(r"netsrv: ready", timeout=60)
            assert links(the_lab.host_a)["tapA"] == "brA"
            with CounterClient(the_lab.client) as c:
                first = c.request()
                assert [c.request() for _ in range(20)] == list(range(first + 1, first + 21))
        finally:
            vmm.stop()


# ---- the demo, end to end (needs the COLO network support) ------------------------------------


def test_readme_first_command_short(kvm_device, images):
    """`./scripts/demo --short`, exactly as the README's first command runs
    (setup included), must tell the story through and pass."""
    require_device("/dev/net/tun", "tun/tap")
    proc = subprocess.Popen([str(REPO / "scripts" / "demo"), "--short", "--kill-after", "3", "--run-after", "2.5"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        text, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, text
    assert "COLO is running" in text and "host A dies" in text and "host B took over" in text
    assert "the guest's MAC address has moved to host B's port" in text
    assert "healed: host B protected the guest with host A by itself" in text  # the second act
    assert "host B dies" in text and "host A took over" in text and "moved to host A's port" in text
    assert "2 hosts died, each survived" in text
    assert "no gap, no duplicate; one TCP connection, never reset" in text and "PASS" in text
    assert "-{}".format(proc.pid) not in netns_list()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_cleans_up(kvm_device, images, sig):
    require_device("/dev/net/tun", "tun/tap")
    proc = subprocess.Popen([sys.executable, "-m", "kvmcolo.demo", "--short"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "client 10.77.0.10 connected" in line:
                break
        else:
            pytest.fail("the demo never got its client connected:\n" + "".join(seen))
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, "".join(seen) + rest
    assert "interrupted" in rest
    assert f"-{proc.pid}" not in netns_list()
    assert not any(f"kvmcolo-demo-{proc.pid}-" in f for f in os.listdir(demo.tempfile.gettempdir()))
    # its VMMs are gone too
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"kvmcolo-demo-{proc.pid}-" not in out
