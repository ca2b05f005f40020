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
import socket
import time

from kvmcolo import jsonsafe
from kvmcolo.colo import Msg
from kvmcolo.errors import UserError
from kvmcolo.wire import Channel, ChannelError, client_handshake, server_handshake

log = logging.getLogger("kvmcolo.colo")

HANDSHAKE_TIMEOUT = 10.0


def connect(peer: tuple[str, int], key: bytes, config: bytes, handshake_timeout: float,
            timeout: float = 60.0) -> Channel:  # fmt: skip
    """The primary's side: connect (retrying until `timeout`), authenticate,
    have `config` accepted.  UserError on any failure."""
    deadline = time.monotonic() + timeout
    addr = f"{peer[0]}:{peer[1]}"
    while True:
        try:
            sock = socket.create_connection(peer, timeout=2)
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise UserError(f"cannot reach the secondary at {addr}: {e.strerror or e}")
            time.sleep(0.2)  # retry pacing, not synchronisation
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return open_primary(sock, addr, key, config, handshake_timeout)


def open_primary(sock: socket.socket, addr: str, key: bytes, config: bytes, handshake_timeout: float) -> Channel:
    """The primary's side on a connected socket (TCP, or a socketpair in
    the in-process test harness)."""
    try:
        channel = client_handshake(sock, key, "primary", addr, handshake_timeout)
    except ChannelError as e:
        sock.close()
        raise UserError(f"replication handshake with {addr} failed: {e}")
    channel.send(Msg.CONFIG, [config])
    mtype, payload = channel.recv()
    if mtype == Msg.CONFIG_REFUSED:
        raise UserError(f"the secondary refused this VM: {bytes(payload).decode()}")
    if mtype != Msg.CONFIG_OK:
        raise UserError(f"the secondary answered {mtype} to CONFIG")
    log.info("connected to the secondary at %s", addr)
    return channel


def accept(server: socket.socket, key: bytes, config: bytes) -> tuple[Channel, str]:
    """The secondary's side: accept primaries until one authenticates, then
    check its CONFIG against ours.  Returns the channel and the peer's
    address; UserError (after telling the primary why) if it does not match."""
    while True:
        sock, addr = server.accept()
        peer = f"{addr[0]}:{addr[1]}"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            channel = server_handshake(sock, key, "secondary", peer, HANDSHAKE_TIMEOUT)
        except ChannelError as e:
            log.warning("refused %s: %s", peer, e)  # nothing it sent is used
            sock.close()
            continue
        return check_config(channel, peer, config), peer


def open_secondary(sock: socket.socket, peer: str, key: bytes, config: bytes) -> Channel:
    """The secondary's side on a connected socket (the in-process harness)."""
    return check_config(server_handshake(sock, key, "secondary", peer, HANDSHAKE_TIMEOUT), peer, config)


def check_config(channel: Channel, peer: str, config: bytes) -> Channel:
    mtype, payload = channel.recv()
    if mtype != Msg.CONFIG:
        raise UserError(f"the primary at {peer} sent {mtype} instead of its configuration")
    try:
        theirs = jsonsafe.loads(bytes(payload))
        problem = config_mismatch(json.loads(config), theirs)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        problem = f"malformed configuration ({type(e).__name__}: {e})"
    if problem:
        channel.send(Msg.CONFIG_REFUSED, [problem.encode()])
        channel.close()
        raise UserError(f"refused the primary at {peer}: {problem}")
    channel.send(Msg.CONFIG_OK)
    return channel


def config_message(machine, host_meta: dict, options: ColoOptions) -> bytes:
    return json.dumps({"machine": comparable_shape(machine.shape()), "host": host_meta,
                       "checkpoint_delay": options.checkpoint_delay}).encode()  # fmt: skip


def comparable_shape(shape: dict) -> dict:
    """The parts of a machine's shape both sides must agree on (not paths or
    tap names, which differ between hosts)."""
    return {
        "mem_size": shape["mem_size"],
        "cpus": shape["cpus"],
        "disks": [{"size": d["size"], "readonly": d["readonly"]} for d in shape["disks"]],
        "nets": [{"mac": n["mac"]} for n in shape["nets"]],
    }


def config_mismatch(ours: dict, theirs: dict) -> str | None:
    """A human-readable difference between two config messages, or None."""
    a, b = ours["machine"], theirs["machine"]
    for key, what in (("mem_size", "RAM"), ("cpus", "vCPUs")):
        if a[key] != b[key]:
            return f"{what} differ: primary {b[key]}, secondary {a[key]}"
    if len(a["disks"]) != len(b["disks"]) or a["disks"] != b["disks"]:
        return f"disks differ: primary {b['disks']}, secondary {a['disks']}"
    if a["nets"] != b["nets"]:
        return f"network devices differ: primary {b['nets']}, secondary {a['nets']}"
    from kvmcolo.vmstate import HostCaps

    mine, other = HostCaps.feature_bits(ours["host"]["cpuid"]), HostCaps.feature_bits(theirs["host"]["cpuid"])
    for leaf, regs in other.items():
        if mine.get(leaf) != regs:
            return f"CPU features (CPUID leaf {leaf}) differ between the hosts"
    if theirs["host"]["xsave_size"] != ours["host"]["xsave_size"]:
        return "XSAVE layouts differ between the hosts"
    return None
