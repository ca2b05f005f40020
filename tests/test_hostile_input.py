"""Input from strangers and careless users (issue 12): deep JSON before
authentication and on the control socket, slow and idle peers, exhausted
descriptors, numbers that would break later, files kvmcolo must not touch,
a truncated kernel, a triple fault.  Each gets a refusal — one line and
exit 2 on the command line — and the server keeps serving the real peer and
the operator.  (The fuzzing of every parser is in test_fuzz.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import struct
import threading

import pytest

from conftest import kvmcolo_cmd, wait_until
from kvmcolo import control, jsonsafe, wire
from kvmcolo.control import ControlServer

DEEP = "[" * 100_000


# ---- deep JSON is a refusal, never a RecursionError ---------------------------------


def test_jsonsafe_refuses_deep_and_broken_input():
    for bad in (DEEP, "[" * 1000, "[" * 40 + "]" * 40, b"\xff\xfe", "{", ""):
        with pytest.raises(jsonsafe.JSONRefused):
            jsonsafe.loads(bad)
    assert jsonsafe.loads('{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}


@pytest.mark.parametrize("where", ["hello", "proof"])
def test_handshake_with_deep_json_is_refused_as_a_handshake_error(where):
    a, b = socket.socketpair()
    with a, b:
        deep = b"[" * 1000
        if where == "hello":
            a.sendall(struct.pack("<HI", 0xFFF0, len(deep)) + deep)  # a HELLO whose body nests 1,000 deep
        else:
            hello = json.dumps({"version": wire.PROTOCOL_VERSION, "role": "primary", "nonce": "00" * 32}).encode()
            a.sendall(struct.pack("<HI", 0xFFF0, len(hello)) + hello + struct.pack("<HI", 0xFFF1, len(deep)) + deep)
        with pytest.raises(wire.ChannelError):
            wire.server_handshake(b, b"k" * 32, "secondary", "stranger", 5)


def test_control_socket_survives_a_deep_line_and_keeps_answering(tmp_path):
    server = ControlServer(str(tmp_path / "c.sock"), {"query-status": lambda: {"status": "running"}})
    server.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(server.path)
            f = s.makefile("rwb")
            f.readline()
            f.write(DEEP.encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
            assert reply["error"]["class"] == "InvalidJSON"
        assert control.call(server.path, "query-status") == {"status": "running"}
    finally:
        server.close()


def test_status_at_a_socket_that_is_not_kvmcolo_is_one_line(tmp_path):
    path = str(tmp_path / "other.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(4)

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return  # the test closed the listener
            c.sendall(b"220 some other service\r\n")
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    proc = kvmcolo_cmd("status", "--control", path, timeout=30)
    srv.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- numbers that validate are numbers that work ------------------------------------------


@pytest.mark.parametrize("option", ["--checkpoint-delay", "--heartbeat-interval", "--heartbeat-timeout",
                                    "--compare-timeout", "--max-queue"])  # fmt: skip
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e13", "0", "-5", "ten"])
def test_numeric_options_must_be_finite_and_in_range(tmp_path, option, value):
    key = tmp_path / "k"
    key.write_text("x" * 32)
    proc = kvmcolo_cmd("boot", "--primary", "--peer", "127.0.0.1:9", "--key-file", str(key), f"{option}={value}",
                       "--image", "hello", timeout=30)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and option in lines[0] and "Traceback" not in proc.stderr


def test_cpus_must_be_a_sane_integer():
    for value in ("0", "1e9", "two", "nan"):
        proc = kvmcolo_cmd("run", "--image", "hello", "--cpus", value, timeout=30)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- never remove or replace what kvmcolo did not create --------------------------------


def digest(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_control_path_that_is_a_file_or_folder_is_refused_and_kept(images, tmp_path):
    guard = tmp_path / "disk.img"
    guard.write_bytes(os.urandom(4096))
    before = digest(guard)
    folder = tmp_path / "dir"
    folder.mkdir()
    for target in (guard, folder):
        proc = kvmcolo_cmd("run", "--image", "hello", "--control", str(target), timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "is not a socket" in proc.stderr and "Traceback" not in proc.stderr
    assert digest(guard) == before and folder.is_dir()


def test_control_path_too_long_for_a_socket(images, tmp_path):
    proc = kvmcolo_cmd("run", "--image", "hello", "--control", str(tmp_path / ("x" * 200)), timeout=60)
    assert proc.returncode == 2 and "shorter than 108" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_key_file_that_is_not_a_small_regular_file_is_refused_at_once(tmp_path, kind):
    if kind == "fifo":
        path = tmp_path / "key.fifo"
        os.mkfifo(path)
    elif kind == "device":
        path = "/dev/zero"
    else:
        path = tmp_path / "key.big"
        path.write_bytes(b"k" * (wire.MAX_KEY_FILE + 1))
    proc = kvmcolo_cmd("boot", "--primary", "--peer", "127.0.0.1:9", "--key-file", str(path), "--image", "hello",
                       timeout=20)  # fmt: skip (a FIFO that blocked would time out here)
    assert proc.returncode == 2 and "key file" in proc.stderr and "Traceback" not in proc.stderr


def test_overlay_dir_that_is_a_file(images, tmp_path):
    key = tmp_path / "k"
    key.write_text("x" * 32)
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("keep me")
    proc = kvmcolo_cmd("boot", "--secondary", "--listen", "127.0.0.1:0", "--key-file", str(key), "--disk", str(disk),
                       "--overlay-dir", str(not_a_dir), "--image", "disk", timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and "Traceback" not in proc.stderr
    assert not_a_dir.read_text() == "keep me"


# ---- kernels and guests ---------------------------------------------------------------------


def test_truncated_kernel_is_refused(images, tmp_path):
    whole = (images / "hello.elf").read_bytes()
    cut = tmp_path / "half.elf"
    cut.write_bytes(whole[: len(whole) // 2])
    proc = kvmcolo_cmd("run", "--kernel", str(cut), timeout=30)
    assert proc.returncode == 2 and "truncated" in proc.stderr and "Traceback" not in proc.stderr


# ---- files named by mistake: refused, left as they were, never waited on --------------


def test_snapshot_onto_a_device_node_or_a_folder_is_refused(images, tmp_path):
    import stat as st

    from test_snapshot import quit_vmm, start_vmm

    device = tmp_path / "null"
    os.mknod(device, st.S_IFCHR | 0o600, os.makedev(1, 3))
    folder = tmp_path / "snaps"
    folder.mkdir()
    g = start_vmm(tmp_path, "a", "run", "--image", "dirty", "--", "pages=64", "report=100000")
    try:
        for target in (device, folder):
            proc = kvmcolo_cmd("snapshot", "--control", str(tmp_path / "a.sock"), str(target), timeout=30)
            assert proc.returncode == 2 and "cannot write snapshot" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
        assert st.S_ISCHR(os.stat(device).st_mode) and folder.is_dir()
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temporary file left behind
        assert g.call("query-status")["status"] == "running"  # and the VMM goes on
    finally:
        quit_vmm(g)


@pytest.mark.parametrize("role", ["kernel", "snapshot"])
def test_a_fifo_is_refused_at_once(tmp_path, role):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    args = ("run", "--kernel", str(fifo)) if role == "kernel" else ("restore", str(fifo))
    proc = kvmcolo_cmd(*args, timeout=20)  # a blocking open would time out here
    assert proc.returncode == 2 and "is not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_an_unresolvable_peer_fails_fast(tmp_path):
    import time

    key = tmp_path / "k"
    key.write_text("x" * 32)
    t0 = time.monotonic()
    proc = kvmcolo_cmd("boot", "--primary", "--peer", "no-such-host.invalid:7777", "--key-file", str(key),
                       "--image", "hello", timeout=40)  # fmt: skip
    assert proc.returncode == 2 and "cannot resolve" in proc.stderr and "Traceback" not in proc.stderr
    assert time.monotonic() - t0 < 30  # not the 60 s of retries a reachable-but-down peer gets


# ---- the operator always gets through -----------------------------------------------------


def test_control_socket_answers_with_hundreds_of_idle_clients(tmp_path):
    server = ControlServer(str(tmp_path / "c.sock"), {"query-status": lambda: {"status": "running"}})
    server.start()
    idle = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.path)
            idle.append(s)
        assert control.call(server.path, "query-status", timeout=5) == {"status": "running"}
    finally:
        for s in idle:
            s.close()
        server.close()


SERVER_AT_FD_LIMIT = """
import resource, sys, time
from kvmcolo.control import ControlServer
resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))
server = ControlServer(sys.argv[1], {"query-status": lambda: {"status": "running"}})
server.start()
print("ready", flush=True)
sys.stdin.read()
server.close()
"""


def test_control_socket_keeps_serving_when_out_of_file_descriptors(tmp_path):
    """A server at nofile=48 and 100 idle clients: accept() hits EMFILE; the
    longest-idle clients make room, the thread lives, the operator gets in."""
    import subprocess
    import sys

    path = str(tmp_path / "c.sock")
    proc = subprocess.Popen([sys.executable, "-c", SERVER_AT_FD_LIMIT, path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    idle = []
    try:
        assert proc.stdout.readline().strip() == "ready"
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)  # queued in the backlog even when the server cannot accept
            idle.append(s)
        assert control.call(path, "query-status", timeout=10) == {"status": "running"}
    finally:
        for s in idle:
            s.close()
        proc.stdin.close()
        proc.wait(10)
    stderr = proc.stderr.read()
    assert "cannot accept it" in stderr and "Traceback" not in stderr


# ---- one slow peer starves no one (class 2) ------------------------------------------------


def test_a_trickling_handshake_ends_at_its_deadline():
    """A byte every 0.3 s kept a per-read timeout happy forever; the handshake's
    single deadline ends it."""
    a, b = socket.socketpair()
    stop = threading.Event()

    def trickle():
        hello = struct.pack("<HI", 0xFFF0, 200) + b" " * 200
        for byte in hello:
            if stop.wait(0.3):
                return
            try:
                a.send(bytes([byte]))
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        with pytest.raises(wire.PeerLost, match="not completed in time"):
            wire.server_handshake(b, b"k" * 32, "secondary", "trickler", 1.5)
    finally:
        stop.set()
        a.close()
        b.close()


def test_secondary_pairs_despite_idle_trickling_and_garbage_connections(images, tmp_path):
    """Strangers hold the replication port before the real primary comes:
    one idle connection, one trickling a byte a second, and 40 sending
    garbage.  The primary still pairs, and the refusals are counted rather
    than logged one line each."""
    from colo_pair import ADDR_B, PORT, ColoPair
    from test_colo import DIRTY, VM

    pair = ColoPair(tmp_path, VM, DIRTY, start=False)
    strangers = []
    stop = threading.Event()
    try:
        pair.start_secondary(VM)
        with pair.a.entered():
            idle = socket.create_connection((ADDR_B, PORT))
            trickler = socket.create_connection((ADDR_B, PORT))
            strangers += [idle, trickler]
            for i in range(40):
                s = socket.create_connection((ADDR_B, PORT))
                s.sendall(os.urandom(64) if i % 2 else b"GET / HTTP/1.0\r\n\r\n")
                strangers.append(s)

        def trickle():
            while not stop.wait(1.0):
                try:
                    trickler.send(b"\xf0")
                except OSError:
                    return

        threading.Thread(target=trickle, daemon=True).start()
        wait_until(lambda: any("refused" in line for line in pair.secondary.stderr_lines), "garbage refused")
        pair.start_primary(VM, DIRTY)  # waits for its control socket and two checkpoints
        assert pair.primary.proc.poll() is None
        refusals = [line for line in pair.secondary.stderr_lines if "replication port: refused" in line]
        assert 1 <= len(refusals) <= 3, refusals  # not 40 lines
        assert any("more connection(s)" in line for line in pair.secondary.stderr_lines)
        assert not any("Traceback" in line for line in pair.secondary.stderr_lines)
    finally:
        stop.set()
        for s in strangers:
            s.close()
        pair.close()


def test_primary_retries_a_secondary_that_does_not_answer_in_time(tmp_path):
    """A secondary busy past the primary's handshake deadline on the first
    attempt: the primary retries (with backoff) and pairs on a later one."""
    from kvmcolo import colo_link

    key = b"a shared key of enough bytes"
    server = socket.create_server(("127.0.0.1", 0))
    attempts = []

    def secondary():
        first, _ = server.accept()  # accepted, never answered: the primary's deadline passes
        attempts.append(first)
        conn, _ = server.accept()
        attempts.append(conn)
        ch = wire.server_handshake(conn, key, "secondary", "primary", 5)
        assert ch.recv()[0] == colo_link.Msg.CONFIG
        ch.send(colo_link.Msg.CONFIG_OK)

    t = threading.Thread(target=secondary, daemon=True)
    t.start()
    try:
        config = json.dumps({"machine": {"mem_size": 64 << 20}}).encode()
        channel = colo_link.connect(server.getsockname(), key, config, handshake_timeout=0.5, timeout=20)
        channel.close()
        assert len(attempts) == 2
    finally:
        for s in attempts:
            s.close()
        server.close()
        t.join(5)


def test_control_socket_answers_with_a_thousand_idle_a_non_reading_and_a_deep_client(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, max(hard, 2048)))  # root may raise it; CI runs as root
    server = ControlServer(str(tmp_path / "c.sock"), {"query-status": lambda: {"status": "running"}})
    server.start()
    clients = []
    stop = threading.Event()
    try:
        hog = socket.socket(socket.AF_UNIX)  # sends requests as fast as it can and never reads a reply
        hog.connect(server.path)
        clients.append(hog)

        def flood():
            line = b'{"execute": "query-status"}\n' * 1000
            while not stop.is_set():
                try:
                    hog.send(line)
                except OSError:
                    return

        threading.Thread(target=flood, daemon=True).start()
        deep = socket.socket(socket.AF_UNIX)  # half a deep line, still arriving
        deep.connect(server.path)
        deep.sendall(b"[" * 500_000)
        clients.append(deep)
        wait_until(lambda: _unread(hog) > 4096, "the non-reading client's replies back up")  # over 100 unread
        for _ in range(5):  # each within its deadline, not after a 10 s wait on the hog
            assert control.call(server.path, "query-status", timeout=3) == {"status": "running"}
        for _ in range(1000):  # then a thousand idle clients on top
            s = socket.socket(socket.AF_UNIX)
            s.connect(server.path)
            clients.append(s)
        for _ in range(5):
            assert control.call(server.path, "query-status", timeout=3) == {"status": "running"}
    finally:
        stop.set()
        for s in clients:
            s.close()
        server.close()


def _unread(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    import fcntl
    import termios

    return struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0\0\0\0"))[0]


# ---- sizes are trusted only once authenticated (class 3) ------------------------------------


def test_a_forged_frame_header_is_refused_before_its_length_is_used():
    """A header injected into an authenticated stream claims 60 GiB: refused
    on its header tag, with nothing allocated or waited for."""
    a, b = socket.socketpair()
    with a, b:
        channel = wire.Channel(b, b"s" * 32, b"r" * 32, "peer", 5)
        a.sendall(struct.pack("<HHIQQ", 3, 0, 0, 0, 60 << 30) + b"\0" * wire.HEADER_TAG_BYTES)
        with pytest.raises(wire.AuthenticationError, match="frame header from peer failed authentication"):
            channel.recv()


def test_an_authenticated_frame_larger_than_the_link_carries_is_refused():
    a, b = socket.socketpair()
    with a, b:
        sender = wire.Channel(a, b"k" * 32, b"x" * 32, "us", 5)
        receiver = wire.Channel(b, b"x" * 32, b"k" * 32, "peer", 5)
        receiver.max_payload = 1000
        header = struct.pack("<HHIQQ", 3, 0, 0, 0, 38 << 30)  # a peer with the key, lying about the length
        a.sendall(header + wire._header_tag(b"k" * 32, header))
        with pytest.raises(wire.ChannelError, match="carries at most 1000"):
            receiver.recv()
        sender.close()


def test_state_metadata_of_the_wrong_shape_is_a_format_error():
    from kvmcolo import sections, vmstate

    def stream(meta) -> bytes:
        secs = [sections.Section(b"META", 1, json.dumps(meta).encode()), sections.Section(b"VMST", 1, b""),
                sections.Section(b"DEVS", 1, b"{}"), sections.Section(b"RAM ", 1, struct.pack("<I", 0))]  # fmt: skip
        return b"".join(bytes(p) for p in sections.encode(secs))

    for meta in ([1], {"state_version": 1}, {"state_version": "1"},
                 {"state_version": 1, "kind": "full", "id": "x", "parent": None, "host": {},
                  "machine": {"mem_size": True, "cpus": 1, "ioeventfd": False, "disks": [], "nets": []}}):  # fmt: skip
        with pytest.raises(sections.StateFormatError):
            vmstate.parse(stream(meta))


def test_check_shape():
    jsonsafe.check_shape({"a": [1, 2], "b": {"x": "y"}, "extra": 0}, {"a": [int], "b": {str: str}})
    for value, shape in (({"a": ["1"]}, {"a": [int]}), ({}, {"a": int}), ({"a": True}, {"a": int}),
                         ([], {"a": int}), ({"a": {"x": 1}}, {"a": {str: str}})):  # fmt: skip
        with pytest.raises(jsonsafe.JSONRefused):
            jsonsafe.check_shape(value, shape)
