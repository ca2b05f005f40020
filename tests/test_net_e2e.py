"""virtio-net end to end: the `netsrv` guest on a real tap in a network
namespace, with real clients (ping, Python sockets, curl, nc)."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from conftest import require_device
from guest_net import COUNTER_PORT, ECHO_PORT, GUEST_ADDR, HTTP_PORT, UDP_PORT, NetsrvGuest


@pytest.fixture(scope="module")
def guest(images):
    require_device("/dev/net/tun", "tun/tap")
    g = NetsrvGuest()
    yield g
    g.close()


def connect(guest, port: int, timeout: float = 10) -> socket.socket:
    with guest.ns.entered():
        s = socket.create_connection((GUEST_ADDR, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} bytes"
        buf += chunk
    return bytes(buf)


def recv_line(s: socket.socket) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        assert chunk, "connection closed mid-line"
        buf += chunk
    return bytes(buf)


def test_ready_line_reports_mac(guest):
    assert guest.ready.group(1) == GUEST_ADDR
    assert guest.ready.group(2) == "52:54:00:12:34:56"


def test_ping(guest):
    r = guest.ns.run("ping", "-c", "3", "-i", "0.2", "-W", "2", GUEST_ADDR)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 received" in r.stdout


def test_udp_echo(guest):
    with guest.ns.entered():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    with s:
        for i in range(50):
            payload = os.urandom(1 + i * 20)
            s.sendto(payload, (GUEST_ADDR, UDP_PORT))
            data, addr = s.recvfrom(2048)
            assert data == payload and addr == (GUEST_ADDR, UDP_PORT)


def test_tcp_echo_many_requests(guest):
    with connect(guest, ECHO_PORT) as s:
        for i in range(200):
            msg = f"request {i} ".encode() * (1 + i % 7)
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg


def test_tcp_echo_one_megabyte(guest):
    data = os.urandom(1 << 20)
    with connect(guest, ECHO_PORT, timeout=60) as s:
        sender = threading.Thread(target=s.sendall, args=(data,))
        sender.start()
        got = recv_exactly(s, len(data))
        sender.join()
    assert got == data


def test_counter_over_concurrent_connections(guest):
    conns = [connect(guest, COUNTER_PORT) for _ in range(6)]
    values = []
    try:
        for round_ in range(30):
            for c in conns:
                c.sendall(f"next {round_}\n".encode())
            for c in conns:
                values.append(int(recv_line(c)))
    finally:
        for c in conns:
            c.close()
    assert len(set(values)) == len(values) == 180  # each request its own value
    assert sorted(values) == list(range(min(values), min(values) + 180))  # no gaps
    # Every connection sees increasing values.
    per_conn = [values[i::6] for i in range(6)]
    assert all(a < b for seq in per_conn for a, b in zip(seq, seq[1:]))


def test_counter_with_nc(guest):
    r = guest.ns.run("sh", "-c", f"printf 'a\\nb\\nc\\n' | nc -N -w 5 {GUEST_ADDR} {COUNTER_PORT}")
    assert r.returncode == 0, r.stderr
    got = [int(x) for x in r.stdout.split()]
    assert len(got) == 3 and got[1] == got[0] + 1 and got[2] == got[1] + 1


def test_http_counter_with_curl(guest):
    first = guest.ns.run("curl", "-sS", "--max-time", "10", f"http://{GUEST_ADDR}:{HTTP_PORT}/counter")
    second = guest.ns.run("curl", "-sS", "--max-time", "10", f"http://{GUEST_ADDR}:{HTTP_PORT}/counter")
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert int(second.stdout) > int(first.stdout)
    missing = guest.ns.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                           f"http://{GUEST_ADDR}:{HTTP_PORT}/nothing")  # fmt: skip
    assert missing.stdout == "404"


def test_closed_port_is_refused(guest):
    with pytest.raises(ConnectionRefusedError):
        connect(guest, 4444)


def test_vmm_reports_no_errors(guest):
    assert guest.vmm.proc.poll() is None
    assert not [line for line in guest.vmm.stderr_lines if "needs reset" in line or "failed" in line]
