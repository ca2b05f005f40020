"""Fuzz targets: every parser a stranger or a guest reaches, one function
each taking the fuzzer's bytes.

Each target feeds the bytes to the real code and catches exactly the typed
refusal that code promises (ChannelError, StateFormatError, UserError, an
error reply); anything else escapes and is a crash.  The same targets run
under hypothesis (tests/test_fuzz.py, bounded, in CI) and under atheris, a
coverage-guided libFuzzer engine (a bounded run in CI, and
benchmarks/fuzz.py for a longer campaign with inputs/s per target).

Targets that need structure to get past the first check (a CRC, a frame
tag) build it from the bytes: `state_sections` makes a well-formed
container of fuzzed sections, `frame_tagged` correctly tagged frames with
fuzzed headers, so the fuzzer reaches the parsers behind the checks.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import types
import zlib

from elf_util import make_bzimage
from kvmcolo import control, kernels, netcompare, packets, sections, vmstate, wire
from kvmcolo.errors import UserError
from kvmcolo.netrewrite import SeqRewriter

KEY = b"the fuzzing key, of enough bytes"
SEND_KEY, RECV_KEY = b"s" * 32, b"r" * 32
MAX_INPUT = 1 << 16  # what one socketpair buffers without a reader


def _fed_socket(data: bytes) -> tuple[socket.socket, socket.socket]:
    """A socket whose peer has sent `data` and closed its sending side."""
    a, b = socket.socketpair()
    a.sendall(data[:MAX_INPUT])
    a.shutdown(socket.SHUT_WR)
    return a, b


# ---- the replication port: before and after authentication ------------------------------


def _handshake(data: bytes, handshake, role: str) -> None:
    a, b = _fed_socket(data)
    with a, b:
        try:
            handshake(b, KEY, role, "fuzz", 1.0)
        except wire.ChannelError:
            pass


def handshake_server(data: bytes) -> None:
    """A stranger speaks first to a waiting secondary."""
    _handshake(data, wire.server_handshake, "secondary")


def handshake_server_framed(data: bytes) -> None:
    """The same with well-formed plain headers, so the bodies reach the JSON
    and nonce checks: data = HELLO body, 0xFF, PROOF body."""
    hello, _, proof = data.partition(b"\xff")
    framed = struct.pack("<HI", 0xFFF0, len(hello)) + hello + struct.pack("<HI", 0xFFF1, len(proof)) + proof
    handshake_server(framed)


def handshake_client(data: bytes) -> None:
    """A primary connecting to something that answers with these bytes."""
    _handshake(data, wire.client_handshake, "primary")


def frame_raw(data: bytes) -> None:
    """Bytes injected into an authenticated stream (a forger on the path)."""
    a, b = _fed_socket(data)
    with a, b:
        channel = wire.Channel(b, SEND_KEY, RECV_KEY, "fuzz", 1.0)
        try:
            while True:
                channel.recv()
        except wire.ChannelError:
            pass


def frame_tagged(data: bytes) -> None:
    """Frames whose header tags are right but whose fields are fuzzed: a
    length that lies, a wrong sequence number, a bad payload tag."""
    stream = bytearray()
    at = 0
    while at + 12 <= len(data):
        mtype, seq, length = struct.unpack_from("<HHQ", data, at)
        at += 12
        header = struct.pack("<HHIQQ", mtype, 0, 0, seq & 3, length)
        stream += header + wire._header_tag(RECV_KEY, header)
        body = data[at : at + min(length, 64)]
        at += len(body)
        stream += body
        stream += wire._mac(RECV_KEY, header, body)  # right only when the length told the truth
    frame_raw(bytes(stream))


# ---- state streams: snapshot files and checkpoint payloads ------------------------------


def state_stream(data: bytes) -> None:
    """Raw bytes as a snapshot file or a checkpoint payload."""
    try:
        vmstate.parse(data)
    except sections.StateFormatError:
        pass


_TAGS = [b"META", b"VMST", b"VCPU", b"DEVS", b"RAM ", b"END ", b"XXXX"]


def _section(tag: bytes, payload: bytes, version: int = 1) -> bytes:
    head = struct.pack("<4sHHQI", tag, version, 0, len(payload), zlib.crc32(payload))
    return head + struct.pack("<I", zlib.crc32(head)) + payload


def state_sections(data: bytes) -> None:
    """A well-formed container (right CRCs, an END) of fuzzed sections, so
    every section parser sees the bytes: data = (tag byte, u16 length,
    payload)*.  A META section names the supported state version and a vCPU
    count, so the parsers behind that check are reached, unless its payload
    starts with "!" (then the rest is the metadata, fuzzed)."""
    out = bytearray(struct.pack("<8sII", sections.MAGIC, sections.FORMAT_VERSION, 0))
    at = 0
    while at + 3 <= len(data):
        tag = _TAGS[data[at] % len(_TAGS)]
        (length,) = struct.unpack_from("<H", data, at + 1)
        payload = data[at + 3 : at + 3 + length]
        at += 3 + len(payload)
        if tag == b"META" and payload[:1] == b"!":
            payload = payload[1:]  # fuzzed metadata as it is
        elif tag == b"META":
            meta = {"state_version": vmstate.STATE_VERSION, "machine": {"cpus": length % 3}, "kind": "full"}
            payload = json.dumps(meta).encode()
        out += _section(tag, payload)
    out += _section(b"END ", b"")
    state_stream(bytes(out))


# ---- what a guest sends: frames through the parser, the comparator, the rewriter -----


def packet_parse(data: bytes) -> None:
    pkt = packets.parse(data)
    if pkt.is_ip:
        pkt.flow(), pkt.reverse_flow(), pkt.payload_len
        bytes(pkt.after_ip_header())
    if pkt.proto == packets.PROTO_TCP:
        bytes(pkt.tcp_payload())
        packets.tcp_checksum_ok(data, pkt)


def _frames(data: bytes):
    """data = (side/kind byte, u16 length, frame)*."""
    at = 0
    while at + 3 <= len(data):
        kind = data[at]
        (length,) = struct.unpack_from("<H", data, at + 1)
        frame = data[at + 3 : at + 3 + min(length, 2048)]
        at += 3 + len(frame)
        yield kind, frame


def comparator(data: bytes) -> None:
    """A sequence of PVM frames, SVM frames, checkpoints and ticks."""
    c = netcompare.Comparator(timeout=0.5, max_queue=64, max_secondary_bytes=1 << 16)
    epoch, now = 0, 0.0
    for kind, frame in _frames(data):
        now += 0.01 * (kind >> 4)
        match kind & 3:
            case 0:
                c.primary(frame, epoch, now)
            case 1:
                c.secondary(frame, epoch, now)
            case 2:
                c.checkpoint_started()
                epoch += 1
                c.checkpoint(epoch, now)
            case 3:
                c.tick(now)
    c.stats()


def rewriter(data: bytes) -> None:
    """Frames into and out of the SVM through the sequence rewriter."""
    r = SeqRewriter()
    now = 0.0
    for kind, frame in _frames(data):
        now += 0.01
        match kind & 3:
            case 0:
                r.inbound(bytearray(frame), None, now)
            case 1:
                r.outbound(bytearray(frame), now)
            case 2:
                r.tick(now)
            case 3:
                r.ready()


# ---- the control socket's request parser -------------------------------------------------


def _commands():
    def snapshot(path: str, incremental: bool = False):
        if not isinstance(path, str):
            raise control.CommandError("path must be a string")
        return {"path": path, "incremental": bool(incremental)}

    return {"query-status": lambda: {"status": "running"}, "snapshot": snapshot, "stop": lambda: {}}


_SERVER = types.SimpleNamespace(commands=_commands())


def control_line(data: bytes) -> None:
    """One request line; the reply must be an object the server can send."""
    reply, _ = control.ControlServer.handle_line(_SERVER, data)
    assert isinstance(reply, dict) and ("return" in reply or "error" in reply), reply
    json.dumps(reply)


# ---- the kernel loader -------------------------------------------------------------------

_KERNEL_PATH = os.path.join(tempfile.gettempdir(), f"kvmcolo-fuzz-{os.getpid()}.kernel")


def kernel_loader(data: bytes) -> None:
    """Bytes as a --kernel file: told apart by format, then parsed as a PVH
    ELF or a bzImage (seeded with a real PVH image and a bzImage header)."""
    with open(_KERNEL_PATH, "wb") as f:
        f.write(data)
    try:
        kernels.read_kernel(_KERNEL_PATH)
    except UserError:
        pass


TARGETS = {f.__name__: f for f in (handshake_server, handshake_server_framed, handshake_client, frame_raw,
                                   frame_tagged, state_stream, state_sections, packet_parse, comparator, rewriter,
                                   control_line, kernel_loader)}  # fmt: skip


# ---- seeds: valid inputs for the fuzzer to start from ------------------------------------


def _hello(nonce: bytes = b"\x01" * 32, **extra) -> bytes:
    body = json.dumps({"version": wire.PROTOCOL_VERSION, "role": "primary", "nonce": nonce.hex(), **extra}).encode()
    return struct.pack("<HI", 0xFFF0, len(body)) + body


def _state_seed() -> bytes:
    meta = {"state_version": vmstate.STATE_VERSION, "machine": {"cpus": 1}, "kind": "full", "id": "0" * 32}
    ram = struct.pack("<I", 1) + struct.pack("<IQI", 0, 8 * 4096, 2) + struct.pack("<II", 1, 5) + b"\xaa" * 8192
    secs = [sections.Section(b"META", 1, json.dumps(meta).encode()),
            sections.Section(b"VMST", 1, vmstate.pack_blobs({"clock": b"\0" * 48, "irqchip": b"\1" * 16})),
            sections.Section(b"VCPU", 1, vmstate.pack_blobs({"regs": b"\2" * 144, "sregs": b"\3" * 312})),
            sections.Section(b"DEVS", 1, json.dumps({"serial": {"lcr": 3}}).encode()),
            sections.Section(b"RAM ", 1, ram)]  # fmt: skip
    return b"".join(bytes(p) for p in sections.encode(secs))


def _frame_seeds() -> list[bytes]:
    a, b = b"\x02\0\0\0\0\1", b"\x02\0\0\0\0\2"
    ip1, ip2 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    return [bytes(packets.build_tcp(a, b, ip1, ip2, 40000, 80, 1000, 0, 0x02)),
            bytes(packets.build_tcp(a, b, ip1, ip2, 40000, 80, 1001, 5000, 0x18, b"GET / HTTP/1.0\r\n\r\n")),
            bytes(packets.build_udp(a, b, ip1, ip2, 5353, 53, b"\0" * 12)),
            packets.gratuitous_arp(a, ip1)]  # fmt: skip


def _sequence(frames: list[bytes], kinds: list[int]) -> bytes:
    return b"".join(bytes([k]) + struct.pack("<H", len(f)) + f for k, f in zip(kinds, frames))


def seeds(name: str, pvh_image: bytes | None = None) -> list[bytes]:
    """Valid (or nearly valid) inputs for a target: where the fuzzer starts."""
    frames = _frame_seeds()
    header = struct.pack("<HHQ", 3, 0, 5) + b"hello"
    state = _state_seed()
    return {
        "handshake_server": [_hello(), _hello() + struct.pack("<HI", 0xFFF1, 80) + b'{"proof": "' + b"0" * 64 + b'"}'],
        "handshake_server_framed": [_hello()[6:] + b"\xff" + b'{"proof": "00"}'],
        "handshake_client": [_hello(proof="00" * 32)],
        "frame_raw": [b"\0" * 72],
        "frame_tagged": [header, header + header],
        "state_stream": [state],
        "state_sections": [b"\0" + struct.pack("<H", 4) + b"meta" + b"\4" + struct.pack("<H", 30) + state[-30:],
                           _sequence([b'!{"state_version": 1, "machine": {}}', b"", b"{}", b""], [0, 1, 3, 4])],
        "packet_parse": frames,
        "comparator": [_sequence(frames + frames, [0, 0, 0, 0, 1, 1, 1, 1]), _sequence(frames, [0, 2, 1, 3])],
        "rewriter": [_sequence(frames + frames, [0, 1, 0, 1, 2, 3, 0, 1])],
        "control_line": [b'{"execute": "query-status", "id": 1}', b'{"execute": "snapshot", "arguments": {"path": "x"}}'],
        "kernel_loader": ([pvh_image] if pvh_image else []) + [make_bzimage()],
    }[name]


MAX_LEN = {"kernel_loader": 1 << 17}  # inputs longer than this are cut (a PVH seed is ~100 KiB)
DEFAULT_MAX_LEN = 4096


# ---- running a target under atheris (in a subprocess: it instruments at import) ----------


# The tests' campaign: a fixed number of inputs per target (about 4 s at the
# rates measured here, README "Fuzzing"), so that with a fixed seed it is
# the same walk on every run and machine.  A time-bound campaign is not: a
# faster run walks further, and CI once found an old bug that way.
CI_RUNS = {"comparator": 50_000, "control_line": 500_000, "frame_raw": 150_000, "frame_tagged": 80_000,
           "handshake_client": 120_000, "handshake_server": 120_000, "handshake_server_framed": 110_000,
           "kernel_loader": 2_500, "packet_parse": 800_000, "rewriter": 50_000, "state_sections": 60_000,
           "state_stream": 600_000}  # fmt: skip


def atheris_campaign(name: str, seconds: int, workdir: str, elf: str | None = None, seed: int | None = None,
                     runs: int | None = None) -> dict:  # fmt: skip
    """Run fuzz_atheris.py on one target for `seconds` (or for `runs`
    inputs, `seconds` then only a cap): the crash it found (its report) or
    None, how many inputs it ran and how many per second.  `seed` fixes
    libFuzzer's random choices (with `runs`, the same walk on every commit
    and machine); None draws a new one (the long campaign explores further)."""
    runner = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz_atheris.py")
    options = [f"-max_total_time={seconds}", f"-max_len={MAX_LEN.get(name, DEFAULT_MAX_LEN)}",
               f"-artifact_prefix={os.path.join(workdir, name)}-", "-rss_limit_mb=4096"]  # fmt: skip
    if seed is not None:
        options.append(f"-seed={seed}")
    if runs is not None:
        options.append(f"-runs={runs}")
    proc = subprocess.run([sys.executable, runner, name, os.path.join(workdir, f"corpus-{name}"), *options],
                          capture_output=True, text=True, env=dict(os.environ, KVMCOLO_FUZZ_ELF=str(elf or "")),
                          timeout=seconds + 120)  # fmt: skip
    done = re.findall(r"#(\d+)\s+DONE .*?exec/s: (\d+)", proc.stderr)
    crash = None
    if proc.returncode != 0 or not done:
        at = proc.stderr.find("=== Uncaught Python exception")
        crash = proc.stderr[at : at + 3000] if at >= 0 else proc.stderr[-3000:]
    inputs, rate = (int(done[-1][0]), int(done[-1][1])) if done else (0, 0)
    return {"target": name, "crash": crash, "inputs": inputs, "per_second": rate}
