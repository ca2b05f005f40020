"""Layer 4: the replication channel — framed, authenticated messages over TCP.

The checkpoint stream can rewrite a VM entirely, so nothing is accepted from
a peer that has not proved it knows the shared key, and every frame after
that is authenticated.

Handshake (mutual challenge-response, HMAC-SHA256 with the shared key K):

    client -> HELLO {version, role, nonce_c}
    server -> HELLO {version, role, nonce_s, proof = HMAC(K, "server"|nonce_c|nonce_s)}
    client -> PROOF {proof = HMAC(K, "client"|nonce_c|nonce_s)}

Each direction then gets its own session key, HMAC(K, "c2s"|nonces) and
HMAC(K, "s2c"|nonces), so a frame cannot be reflected back at its sender.

Frame:  type u16 | flags u16 | reserved u32 | seq u64 | length u64   (24 bytes)
        header tag = HMAC-SHA256(session key, "H" | header)[:16]   (16 bytes)
        payload (length bytes)
        tag = HMAC-SHA256(session key, header | payload)              (32 bytes)

The header has its own tag so that its length is authenticated before the
receiver allocates or waits for that many bytes: a forged header injected
into the stream (claiming 64 GiB, say) is refused at once, not after an
allocation.  `seq` counts frames per direction from 0: a replayed, dropped
or reordered frame fails the check.  A frame with a bad tag is never handed
to the caller: recv() raises AuthenticationError, and the caller drops the
connection.
Payloads are sent with sendmsg() straight from their buffers and received
with recv_into() into a reusable buffer (no per-frame copies).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import socket
import struct
import sys
import termios
import threading
import time

from kvmcolo import jsonsafe
from kvmcolo.buffers import consume, split_views
from kvmcolo.errors import UserError
from kvmcolo.files import open_regular

PROTOCOL_VERSION = 2  # 2: the frame header has its own tag
MIN_KEY_BYTES = 16
_FRAME = struct.Struct("<HHIQQ")
HEADER_TAG_BYTES = 16
TAG_BYTES = 32
HANDSHAKE_LIMIT = 4096
# The largest payload a channel accepts until told otherwise (the CONFIG
# exchange is small); once the machine is agreed, the link raises it to what
# a full copy of that machine can need (colo_link.payload_limit).
DEFAULT_MAX_PAYLOAD = 1 << 20
PROGRESS_CHUNK = 1 << 20
STREAM_CHUNK = 1 << 20  # a frame is MAC'd and sent, received and verified, this much at a time


class ChannelError(Exception):
    """The connection failed or the peer broke the protocol."""


class PeerLost(ChannelError):
    """No data from the peer within the timeout, or the connection closed."""


class AuthenticationError(ChannelError):
    """The peer does not know the key, or a frame was forged or damaged."""


MAX_KEY_FILE = 4096


def load_key(path: str) -> bytes:
    """The shared secret: a regular file of at most MAX_KEY_FILE bytes (a FIFO
    or a device such as /dev/zero is refused, never read or waited on)."""
    try:
        with open_regular(path, "key file") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_KEY_FILE:
                raise UserError(f"key file {path!r} is {size} bytes; a key file holds at most {MAX_KEY_FILE}")
            key = f.read(MAX_KEY_FILE + 1).strip()
    except FileNotFoundError:
        raise UserError(f"key file {path!r} does not exist")
    except IsADirectoryError:
        raise UserError(f"key file {path!r} is not a regular file")
    except OSError as e:
        raise UserError(f"cannot read key file {path!r}: {e.strerror}")
    if len(key) < MIN_KEY_BYTES:
        raise UserError(f"key file {path!r} holds {len(key)} bytes; use at least {MIN_KEY_BYTES} random bytes "
                        "(e.g. head -c 32 /dev/urandom | base64 > FILE)")  # fmt: skip
    return key


FRAME_OVERHEAD = _FRAME.size + HEADER_TAG_BYTES + TAG_BYTES


def _header_tag(key: bytes, header: bytes) -> bytes:
    return hmac.new(key, b"H" + header, hashlib.sha256).digest()[:HEADER_TAG_BYTES]


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


class Channel:
    """One authenticated connection.  send() is thread-safe; recv() is for one thread."""

    def __init__(self, sock: socket.socket, send_key: bytes, recv_key: bytes, peer: str, timeout: float):
        self.sock = sock
        self.peer = peer
        self._send_key = send_key
        self._recv_key = recv_key
        self._send_seq = 0
        self._recv_seq = 0
        self._send_lock = threading.Lock()
        self._header = bytearray(_FRAME.size + HEADER_TAG_BYTES)
        self._tag = bytearray(TAG_BYTES)
        self._buffer = bytearray(1 << 16)
        self.timeout = timeout
        self.max_payload = DEFAULT_MAX_PAYLOAD
        self.last_received = time.monotonic()
        self.last_sent = time.monotonic()
        self.bytes_sent = 0
        self.bytes_received = 0
        sock.settimeout(timeout)

    # ---- sending ---------------------------------------------------------------

    def send(self, mtype: int, payload_parts=(), progress=None, stall_midway: float = 0.0) -> None:
        """Send one frame whose payload is the concatenation of `payload_parts`
        (buffers, not copied).  `progress(sent, total)` is called along the way.
        `stall_midway` (debug, for failure tests): pause that many seconds with
        half of the frame sent."""
        parts = [memoryview(p).cast("B") for p in payload_parts]
        length = sum(len(p) for p in parts)
        with self._send_lock:
            header = _FRAME.pack(mtype, 0, 0, self._send_seq, length)
            mac = hmac.new(self._send_key, header, hashlib.sha256)
            try:
                if stall_midway:
                    for p in parts:
                        mac.update(p)
                    frame = [header, _header_tag(self._send_key, header), *parts, mac.digest()]
                    first, rest = split_views(frame, (length + _FRAME.size) // 2)
                    self._sendall(first, length, progress)
                    if progress:
                        progress(-1, length)  # "stalled" marker for the caller
                    time.sleep(stall_midway)
                    self._sendall(rest, length, progress)
                else:
                    self._send_streaming(header, parts, mac, length, progress)
            except (OSError, TimeoutError) as e:
                raise PeerLost(f"sending to {self.peer} failed: {e}") from e
            self._send_seq += 1
            self.last_sent = time.monotonic()
            self.bytes_sent += length + FRAME_OVERHEAD

    def _send_streaming(self, header: bytes, parts: list[memoryview], mac, length: int, progress) -> None:
        """The frame in slices of STREAM_CHUNK, each MAC'd just before it goes
        (the tag still comes last): hashing one slice overlaps the kernel
        moving the one before, and the receiver verifies as it receives,
        instead of hashing the whole payload before its first byte leaves
        (21 ms for a 41 MB checkpoint here, on each side)."""
        first = [memoryview(header), memoryview(_header_tag(self._send_key, header))]
        sent = 0
        views = list(parts)
        while True:
            batch, views = split_views(views, STREAM_CHUNK)
            for v in batch:
                mac.update(v)
            if not views:
                batch.append(memoryview(mac.digest()))
            sent = self._sendall(first + batch, length, progress, sent)
            first = []
            if not views:
                return

    def _sendall(self, views: list[memoryview], total: int, progress, sent_before: int = 0) -> int:
        """sendmsg until everything is out.  With a progress callback, at most
        PROGRESS_CHUNK bytes go per call so progress is reported along the way.
        Returns the bytes sent so far (`sent_before` plus these)."""
        sent_payload = sent_before
        views = [memoryview(v).cast("B") for v in views]
        while views:
            batch = views[:512]
            if progress is not None:
                batch, room = [], PROGRESS_CHUNK
                for v in views[:512]:
                    if room <= 0:
                        break
                    batch.append(v[:room])
                    room -= len(batch[-1])
            n = self.sock.sendmsg(batch)
            sent_payload += n
            consume(views, n)
            if progress is not None:
                progress(min(sent_payload, total), total)
        return sent_payload

    # ---- receiving -------------------------------------------------------------

    def _recv_exactly(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except (TimeoutError, socket.timeout):
                raise PeerLost(f"nothing from {self.peer} for {self.timeout:.1f} s")
            except OSError as e:
                raise PeerLost(f"connection to {self.peer} failed: {e}")
            if n == 0:
                raise PeerLost(f"{self.peer} closed the connection")
            got += n
            self.last_received = time.monotonic()
            self.bytes_received += n

    def recv(self) -> tuple[int, memoryview]:
        """The next frame, verified.  The payload view is valid until the next recv()."""
        self._recv_exactly(memoryview(self._header))
        header = bytes(self._header[: _FRAME.size])
        if not hmac.compare_digest(_header_tag(self._recv_key, header), bytes(self._header[_FRAME.size :])):
            raise AuthenticationError(f"a frame header from {self.peer} failed authentication (forged or damaged)")
        mtype, _, _, seq, length = _FRAME.unpack(header)
        if length > self.max_payload:
            raise ChannelError(f"frame from {self.peer} claims {length} bytes; this link carries at most "
                               f"{self.max_payload}")  # fmt: skip
        if len(self._buffer) < length:
            self._buffer = bytearray(length)
        payload = memoryview(self._buffer)[:length]
        mac = hmac.new(self._recv_key, header, hashlib.sha256)
        for at in range(0, length, STREAM_CHUNK):  # verified as it arrives (the sender's slices)
            piece = payload[at : at + STREAM_CHUNK]
            self._recv_exactly(piece)
            mac.update(piece)
        self._recv_exactly(memoryview(self._tag))
        if not hmac.compare_digest(mac.digest(), bytes(self._tag)):
            raise AuthenticationError(f"frame {seq} from {self.peer} failed authentication (forged or damaged)")
        if seq != self._recv_seq:
            raise AuthenticationError(f"frame {seq} from {self.peer} out of order (expected {self._recv_seq})")
        self._recv_seq += 1
        return mtype, payload

    def drain(self, timeout: float) -> bool:
        """Wait (at most `timeout` s) until the peer's kernel has acknowledged
        everything sent.  A last message (GOODBYE) must be drained before
        close(): closing a socket with unread input sends a reset, which
        throws away whatever of ours is still queued here — the peer would
        see a lost link instead of the goodbye.  Data the peer's kernel has
        acknowledged survives a reset (it is read before the error)."""
        deadline = time.monotonic() + timeout
        queued = bytearray(4)
        while True:
            try:
                fcntl.ioctl(self.sock.fileno(), termios.TIOCOUTQ, queued)  # SIOCOUTQ: sent but not acknowledged
            except (OSError, ValueError):  # ValueError: closed meanwhile (fileno -1)
                return False
            if int.from_bytes(queued, sys.byteorder) == 0:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)  # the kernel offers no wake-up for "all acknowledged"

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


# ---- handshake -------------------------------------------------------------------

_HELLO = 0xFFF0
_PROOF = 0xFFF1
_PLAIN = struct.Struct("<HI")


# The whole handshake has one deadline (not a timeout per read), so a peer
# trickling a byte at a time cannot hold a handshake open for longer.


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise PeerLost("handshake not completed in time")
    return left


def _send_plain(sock: socket.socket, mtype: int, obj: dict, deadline: float) -> None:
    body = json.dumps(obj).encode()
    sock.settimeout(_remaining(deadline))
    try:
        sock.sendall(_PLAIN.pack(mtype, len(body)) + body)
    except (TimeoutError, socket.timeout):
        raise PeerLost("handshake not completed in time")
    except OSError as e:
        raise PeerLost(f"handshake failed: {e.strerror or e}")


def _recv_plain(sock: socket.socket, expected: int, deadline: float) -> dict:
    head = _read(sock, _PLAIN.size, deadline)
    mtype, length = _PLAIN.unpack(head)
    if mtype != expected or length > HANDSHAKE_LIMIT:
        raise AuthenticationError("peer does not speak the kvmcolo replication protocol")
    try:
        body = jsonsafe.loads(_read(sock, length, deadline))
    except ValueError:
        raise AuthenticationError("malformed handshake")
    if not isinstance(body, dict):
        raise AuthenticationError("malformed handshake")
    return body


def _read(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(_remaining(deadline))
        try:
            chunk = sock.recv(n - len(buf))
        except (TimeoutError, socket.timeout):
            raise PeerLost("handshake not completed in time")
        except OSError as e:
            raise PeerLost(f"handshake failed: {e.strerror or e}")
        if not chunk:
            raise PeerLost("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)


def _session(key: bytes, nc: bytes, ns: bytes) -> tuple[bytes, bytes]:
    return _mac(key, b"c2s", nc, ns), _mac(key, b"s2c", nc, ns)


def client_handshake(sock: socket.socket, key: bytes, role: str, peer: str, timeout: float) -> Channel:
    """The connecting side.  `timeout`: the whole handshake's deadline, and
    the channel's receive timeout after it."""
    deadline = time.monotonic() + timeout
    nc = os.urandom(32)
    _send_plain(sock, _HELLO, {"version": PROTOCOL_VERSION, "role": role, "nonce": nc.hex()}, deadline)
    hello = _recv_plain(sock, _HELLO, deadline)
    try:
        ns = bytes.fromhex(hello["nonce"])
        proof = bytes.fromhex(hello["proof"])
    except (KeyError, ValueError, TypeError):
        raise AuthenticationError(f"{peer} sent a malformed handshake")
    if not hmac.compare_digest(proof, _mac(key, b"server", nc, ns)):
        raise AuthenticationError(f"{peer} does not know the shared key")
    if hello.get("version") != PROTOCOL_VERSION:
        raise ChannelError(f"{peer} speaks replication protocol {hello.get('version')}, we speak {PROTOCOL_VERSION}")
    _send_plain(sock, _PROOF, {"proof": _mac(key, b"client", nc, ns).hex()}, deadline)
    c2s, s2c = _session(key, nc, ns)
    return Channel(sock, c2s, s2c, peer, timeout)


def server_handshake(sock: socket.socket, key: bytes, role: str, peer: str, timeout: float) -> Channel:
    """The accepting side; `timeout` as for client_handshake."""
    deadline = time.monotonic() + timeout
    hello = _recv_plain(sock, _HELLO, deadline)
    try:
        nc = bytes.fromhex(hello["nonce"])
    except (KeyError, ValueError, TypeError):
        raise AuthenticationError(f"{peer} sent a malformed handshake")
    ns = os.urandom(32)
    _send_plain(sock, _HELLO, {"version": PROTOCOL_VERSION, "role": role, "nonce": ns.hex(),
                               "proof": _mac(key, b"server", nc, ns).hex()}, deadline)  # fmt: skip
    proof = _recv_plain(sock, _PROOF, deadline)
    try:
        ok = hmac.compare_digest(bytes.fromhex(proof["proof"]), _mac(key, b"client", nc, ns))
    except (KeyError, ValueError, TypeError):
        ok = False
    if not ok:
        raise AuthenticationError(f"{peer} does not know the shared key")
    if hello.get("version") != PROTOCOL_VERSION:
        raise ChannelError(f"{peer} speaks replication protocol {hello.get('version')}, we speak {PROTOCOL_VERSION}")
    c2s, s2c = _session(key, nc, ns)
    return Channel(sock, s2c, c2s, peer, timeout)
