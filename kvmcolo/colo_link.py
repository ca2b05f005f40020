"""Layer 4: making the replication link — one place for connect (primary),
accept (secondary), authentication and the configuration check.

The primary connects (retrying until a deadline), both sides authenticate
(wire's mutual HMAC challenge), and the primary sends its CONFIG: the
machine's shape, the host capabilities its state needs, its parameters.
The secondary compares it with its own and answers CONFIG_OK or
CONFIG_REFUSED with the first difference.  Nothing is replicated before
CONFIG_OK.
"""

from __future__ import annotations

import json
import logging
import queue
import selectors
import socket
import threading
import time

from kvmcolo import jsonsafe
from kvmcolo.colo import Msg
from kvmcolo.errors import UserError
from kvmcolo.refusals import RefusalLog
from kvmcolo.wire import Channel, ChannelError, PeerLost, client_handshake, server_handshake

log = logging.getLogger("kvmcolo.colo")

HANDSHAKE_TIMEOUT = 10.0  # the secondary's deadline for a whole handshake
MAX_PENDING = 16  # handshakes in progress at once on the secondary
ACCEPT_PAUSE_S = 0.2  # after accept() fails with nothing to free
RETRY_FIRST_S, RETRY_MAX_S = 0.2, 1.0  # the primary's backoff between attempts


def connect(peer: tuple[str, int], key: bytes, config: bytes, handshake_timeout: float,
            timeout: float = 60.0) -> Channel:  # fmt: skip
    """The primary's side: connect and authenticate, retrying with backoff
    until `timeout` (the secondary may not be up yet, or may be busy with a
    stranger's connection), then have `config` accepted.  A wrong key or
    protocol is not retried.  UserError on any failure."""
    deadline = time.monotonic() + timeout
    addr = f"{peer[0]}:{peer[1]}"
    pause = RETRY_FIRST_S
    while True:
        sock = None
        try:
            sock = socket.create_connection(peer, timeout=min(2.0, max(0.1, deadline - time.monotonic())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            channel = client_handshake(sock, key, "primary", addr, handshake_timeout)
            break
        except PeerLost as e:  # reached, but no handshake in time or the connection dropped: retry
            sock.close()
            problem = str(e)
        except ChannelError as e:  # wrong key or protocol: retrying changes nothing
            sock.close()
            raise UserError(f"replication handshake with {addr} failed: {e}")
        except OSError as e:
            if sock is not None:
                sock.close()
            problem = e.strerror or str(e)
        if time.monotonic() + pause > deadline:
            raise UserError(f"cannot reach the secondary at {addr}: {problem}")
        log.debug("secondary at %s: %s; retrying in %.1f s", addr, problem, pause)
        time.sleep(pause)  # retry pacing, not synchronisation
        pause = min(pause * 2, RETRY_MAX_S)
    return _send_config(channel, addr, config)


def open_primary(sock: socket.socket, addr: str, key: bytes, config: bytes, handshake_timeout: float) -> Channel:
    """The primary's side on a connected socket (TCP, or a socketpair in
    the in-process test harness)."""
    try:
        channel = client_handshake(sock, key, "primary", addr, handshake_timeout)
    except ChannelError as e:
        sock.close()
        raise UserError(f"replication handshake with {addr} failed: {e}")
    return _send_config(channel, addr, config)


def _send_config(channel: Channel, addr: str, config: bytes) -> Channel:
    channel.send(Msg.CONFIG, [config])
    mtype, payload = channel.recv()
    if mtype == Msg.CONFIG_REFUSED:
        raise UserError(f"the secondary refused this VM: {bytes(payload).decode(errors='replace')}")
    if mtype != Msg.CONFIG_OK:
        raise UserError(f"the secondary answered {mtype} to CONFIG")
    channel.max_payload = payload_limit(json.loads(config)["machine"]["mem_size"])
    log.info("connected to the secondary at %s", addr)
    return channel


def payload_limit(mem_size: int) -> int:
    """The largest frame a pair for this machine sends: a full copy of its
    RAM with its page lists (4 bytes a page) and the vCPU, VM and device
    state, with room to spare.  A frame claiming more is a broken peer, not
    a reason to allocate."""
    return mem_size + mem_size // 1024 + (64 << 20)


def accept(server: socket.socket, key: bytes, config: bytes) -> tuple[Channel, str]:
    """The secondary's side: accept connections until one authenticates,
    then check its CONFIG against ours.  Returns the channel and the peer's
    address; UserError (after telling the primary why) if it does not match.

    Handshakes run concurrently, each in its own thread with a deadline, so
    an idle, trickling or garbage connection never keeps the real primary
    waiting.  At most MAX_PENDING at once: a new connection beyond that ends
    the oldest pending one."""
    done: queue.SimpleQueue = queue.SimpleQueue()
    wake_r, wake_w = socket.socketpair()
    selector = selectors.DefaultSelector()
    selector.register(server, selectors.EVENT_READ, "accept")
    selector.register(wake_r, selectors.EVENT_READ, "done")
    pending: dict[socket.socket, str] = {}  # in accept order: the first is the oldest
    refusals = RefusalLog(log, "replication port")

    def handshake(sock: socket.socket, peer: str) -> None:
        try:
            result: Channel | ChannelError = server_handshake(sock, key, "secondary", peer, HANDSHAKE_TIMEOUT)
        except ChannelError as e:
            sock.close()
            result = e
        done.put((sock, peer, result))
        try:
            wake_w.send(b"x")
        except OSError:
            pass  # accept() has returned and closed its end: nothing waits for this one

    try:
        while True:
            for event, _ in selector.select():
                if event.data == "accept":
                    _accept_one(server, pending, refusals, handshake)
                    continue
                wake_r.recv(4096)
                while not done.empty():
                    sock, peer, result = done.get()
                    pending.pop(sock, None)
                    if isinstance(result, Channel):
                        refusals.flush()
                        try:
                            return check_config(result, peer, config), peer
                        except WrongMode as e:  # the other side's mistake: this side waits on
                            log.error("%s; still waiting", e)
                        continue
                    refusals.refused(peer, str(result))  # nothing it sent is used
    finally:
        for sock in pending:
            _end(sock)  # its handshake thread fails at once and exits
        selector.close()
        wake_r.close()
        wake_w.close()


def _accept_one(server: socket.socket, pending: dict, refusals: RefusalLog, handshake) -> None:
    try:
        sock, addr = server.accept()
    except OSError as e:  # out of descriptors (EMFILE): the oldest pending connection gives one back
        refusals.refused("a connection", f"cannot accept it ({e.strerror or e})")
        if pending:
            _end(next(iter(pending)))
        else:
            time.sleep(ACCEPT_PAUSE_S)  # nothing to free: do not spin on the listening socket
        return
    if len(pending) >= MAX_PENDING:
        oldest = next(iter(pending))
        refusals.refused(pending.pop(oldest), f"{MAX_PENDING} handshakes pending; the oldest is ended")
        _end(oldest)
    peer = f"{addr[0]}:{addr[1]}"
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    pending[sock] = peer
    threading.Thread(target=handshake, args=(sock, peer), name="handshake", daemon=True).start()


def _end(sock: socket.socket) -> None:
    """End a pending handshake from outside its thread (whose recv returns)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def peer_address(sock: socket.socket) -> tuple[str, int]:
    """(host, port) of a connected socket's peer; ("socketpair", 0) for the
    in-process harness's Unix socketpair."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return "socketpair", 0
    host, port = sock.getpeername()[:2]
    return host, port


def open_secondary(sock: socket.socket, peer: str, key: bytes, config: bytes) -> Channel:
    """The secondary's side on a connected socket (the in-process harness)."""
    return check_config(server_handshake(sock, key, "secondary", peer, HANDSHAKE_TIMEOUT), peer, config)


class WrongMode(UserError):
    """A primary that wants the other kind of connection (a migration at a
    COLO secondary, or the other way round): refused, and the waiting side
    goes on waiting — its own options are not the mistake."""


def check_config(channel: Channel, peer: str, config: bytes) -> Channel:
    mtype, payload = channel.recv()
    if mtype != Msg.CONFIG:
        raise UserError(f"the primary at {peer} sent {mtype} instead of its configuration")
    theirs = None
    try:
        theirs = jsonsafe.loads(bytes(payload))
        problem = config_mismatch(json.loads(config), theirs)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"malformed configuration ({type(e).__name__}: {e})"
    if problem:
        channel.send(Msg.CONFIG_REFUSED, [problem.encode()])
        channel.close()
        wrong_mode = isinstance(theirs, dict) and json.loads(config).get("mode") != theirs.get("mode", MODE_COLO)
        raise (WrongMode if wrong_mode else UserError)(f"refused the primary at {peer}: {problem}")
    channel.send(Msg.CONFIG_OK)
    channel.max_payload = payload_limit(json.loads(config)["machine"]["mem_size"])
    return channel


# What a connection is for: the primary's mode must be the waiting side's.
MODE_COLO = "colo"  # boot --primary / protect -> boot --secondary
MODE_MIGRATE = "migrate"  # migrate -> boot --incoming
MODE_SWITCHOVER = "switchover"  # a switchover's new pair, on the old pair's connection: no copy at all


def config_message(machine, host_meta: dict, options: ColoOptions, mode: str = MODE_COLO) -> bytes:
    return json.dumps({"machine": comparable_shape(machine.shape()), "host": host_meta, "mode": mode,
                       "checkpoint_delay": options.checkpoint_delay}).encode()  # fmt: skip


def comparable_shape(shape: dict) -> dict:
    """The parts of a machine's shape both sides must agree on (not paths or
    tap names, which differ between hosts)."""
    return {
        "mem_size": shape["mem_size"],
        "cpus": shape["cpus"],
        "disks": [{"size": d["size"], "readonly": d["readonly"]} for d in shape["disks"]],
        "nets": [{"mac": n["mac"]} for n in shape["nets"]],
        "cpu": shape["cpu"],
    }


def config_mismatch(ours: dict, theirs: dict) -> str | None:
    """A human-readable difference between two config messages, or None."""
    mine, sent = ours.get("mode", MODE_COLO), theirs.get("mode", MODE_COLO)
    if mine != sent and MODE_SWITCHOVER in (mine, sent):
        return f"a switchover's new pair met a {sent if mine == MODE_SWITCHOVER else mine} connection"
    if mine != sent:
        return ("a migration (kvmcolo migrate) needs 'kvmcolo boot --incoming' on this host, not a COLO secondary"
                if sent == MODE_MIGRATE else "this host waits for a migration (boot --incoming): use 'kvmcolo "
                "migrate', not protect or boot --primary")  # fmt: skip
    a, b = ours["machine"], theirs["machine"]
    for key, what in (("mem_size", "RAM"), ("cpus", "vCPUs")):
        if a[key] != b[key]:
            return f"{what} differ: primary {b[key]}, secondary {a[key]}"
    if len(a["disks"]) != len(b["disks"]) or a["disks"] != b["disks"]:
        return f"disks differ: primary {b['disks']}, secondary {a['disks']}"
    if a["nets"] != b["nets"]:
        return f"network devices differ: primary {b['nets']}, secondary {a['nets']}"
    if a.get("cpu") != b.get("cpu"):
        return f"CPU models differ: primary {b.get('cpu')}, secondary {a.get('cpu')} (give both the same --cpu)"
    from kvmcolo.vmstate import HostCaps

    mine, other = HostCaps.feature_bits(ours["host"]["cpuid"]), HostCaps.feature_bits(theirs["host"]["cpuid"])
    for leaf, regs in other.items():
        if mine.get(leaf) != regs:
            return f"CPU features (CPUID leaf {leaf}) differ between the hosts"
    if theirs["host"]["xsave_size"] != ours["host"]["xsave_size"]:
        return "XSAVE layouts differ between the hosts"
    return None
