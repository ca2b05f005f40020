#!/usr/bin/env python3
"""Where a checkpoint's transfer goes (issue 15), stage by stage, for one
checkpoint of 10,000 dirty pages (41 MB), without VMs:

    .venv/bin/python benchmarks/bench_stream.py [--pages 10000] [--rounds 5]

Per-byte costs the stream pays on one side or the other — section CRC
(both), HMAC-SHA256 (both), a memory copy (the capture's gather, each
kernel copy) — then the authenticated channel end to end (send + receive
+ verify) over a socketpair and over TCP on loopback, against a raw TCP
sendall/recv_into of the same bytes.  Best of --rounds.  On a 2-core host
whose guest keeps one core busy, the sender's and the receiver's work run
one after the other, so the stream's cost is roughly the sum of both
sides' stages (bench_colo.py measures that end to end).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import socket
import sys
import threading
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvmcolo import wire  # noqa: E402
from report import print_table  # noqa: E402


def best_ms(fn, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def channel_pair(a: socket.socket, b: socket.socket, key: bytes) -> tuple[wire.Channel, wire.Channel]:
    sender, receiver = wire.Channel(a, key, key, "a", 30), wire.Channel(b, key, key, "b", 30)
    receiver.max_payload = 1 << 31
    return sender, receiver


def through(sender: wire.Channel, receiver: wire.Channel, payload) -> None:
    """One frame sent and received (verified) on another thread."""
    t = threading.Thread(target=receiver.recv)
    t.start()
    sender.send(15, [payload])
    t.join()


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    for s in (client, peer):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return client, peer


def raw_tcp(client: socket.socket, peer: socket.socket, payload) -> None:
    into = memoryview(bytearray(len(payload)))

    def receive() -> None:
        got = 0
        while got < len(into):
            got += peer.recv_into(into[got:])

    t = threading.Thread(target=receive)
    t.start()
    client.sendall(payload)
    t.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    size = args.pages * 4096
    payload = bytearray(os.urandom(size))
    key = os.urandom(32)
    mb = size / 1e6
    rows = []

    def row(name: str, ms: float, detail: str) -> None:
        rows.append((name, f"{ms:.1f} ms", f"{mb / ms * 1e3 / 1e3:.2f} GB/s; {detail}"))

    row("section CRC-32 (zlib)", best_ms(lambda: zlib.crc32(payload), args.rounds), "sender encodes, receiver verifies")
    row("HMAC-SHA256", best_ms(lambda: hmac.new(key, payload, hashlib.sha256).digest(), args.rounds),
        "sender and receiver, the whole frame")  # fmt: skip
    row("memory copy", best_ms(lambda: bytes(payload), args.rounds), "the capture's gather; each kernel copy")
    a, b = socket.socketpair()
    sender, receiver = channel_pair(a, b, key)
    row("channel, socketpair", best_ms(lambda: through(sender, receiver, payload), args.rounds),
        "send + receive + verify, MAC'd in 1 MiB slices as they go")  # fmt: skip
    client, peer = tcp_pair()
    sender, receiver = channel_pair(client, peer, key)
    row("channel, TCP loopback", best_ms(lambda: through(sender, receiver, payload), args.rounds),
        "the same over TCP (TCP_NODELAY, as the replication link)")  # fmt: skip
    client, peer = tcp_pair()
    row("raw TCP loopback", best_ms(lambda: raw_tcp(client, peer, payload), args.rounds),
        "sendall / recv_into of the same bytes: the floor")  # fmt: skip
    print(f"one checkpoint of {args.pages:,} pages ({mb:.1f} MB), best of {args.rounds}")
    print_table(rows)


if __name__ == "__main__":
    main()
