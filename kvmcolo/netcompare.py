"""Layer 4: the network comparator (QEMU's colo-compare) as a pure core.

Every frame the primary VM (PVM) sends is held here; the frames the
secondary VM (SVM) sends are fed in beside them.  A held primary frame is
released to the LAN once the SVM has produced the same output; when the
outputs differ, when a frame waits too long or when a queue overflows, the
core asks for a checkpoint.  Sans-IO, like h11: events in (`primary`,
`secondary`, `checkpoint_started`, `checkpoint`, `tick`, `alone`), a list
of actions out (`Release`, `RequestCheckpoint`), in order.  No sockets,
threads or clocks inside: `now` is passed in.

Rules
-----
Epochs.  Every frame carries `epoch`, the number of checkpoints before it
was sent (the primary counts captures, the secondary loads).  The core's
epoch E is the last N given to `checkpoint(N)`.  Only primary frames with
epoch <= E are compared (later ones are held untouched until their
checkpoint: the SVM that will reproduce them has not loaded it yet);
secondary frames with epoch < E are stale and dropped, those with epoch > E
wait in a bounded stash until `checkpoint` reaches their epoch.

checkpoint(N): held primary frames with epoch < N are released, in arrival
order (the checkpoint already contains their having been sent); all
secondary data of epoch < N is dropped; each TCP connection is re-based to
the primary's stream position at capture (the highest sequence number its
frames of epoch < N reached) and its SVM acknowledgement to the highest ack
those frames carried; frames still held restart their hold clock at `now`.

1. Link control — not IP (ARP, ...), or IPv6 neighbour discovery / MLD:
   primary frames are released at once ("passthrough"), secondary ones
   dropped (each guest sends them on its own timers).
2. TCP, per connection (the primary's `flow()`; the SVM is the same guest,
   so its frames have the same key):
   - data are compared by stream offset, not per segment: the SVM's bytes
     are kept in a buffer indexed by sequence number and a primary
     segment's payload matches once the SVM covered the same range with the
     same bytes.  `cmp` is the compared mark; bytes below it (primary
     retransmissions) are not compared again.  A FIN matches an SVM FIN at
     the same position.
   - SYN / SYN-ACK match the SVM's next SYN by flags only (the ISNs differ by
     design); the primary's seq+1 starts the compared stream.  A primary
     SYN retransmission needs no new counterpart.
   - RST matches an SVM RST on the connection (FIFO).
   - Pure ACKs (no payload, no SYN/FIN/RST) need no counterpart.
   - Release is in the primary's send order, and a segment with ACK `A` is
     released only once the SVM has acknowledged at least `A`, so the peer
     never hears of data being received that the SVM did not receive.
   - Different bytes (or one side ending its stream where the other sends
     data) -> RequestCheckpoint("net-mismatch tcp"); the connection then
     holds everything, without comparing, until `checkpoint`.
   - The state goes when the guest's FIN or RST has matched and nothing is
     held, or after IDLE_TIMEOUT without frames (pruned in `tick`).
3. UDP (per 5-tuple), ICMP (per (proto, src, dst)) and other IP protocols,
   fragments included (per (src, dst)): FIFO; the i-th primary datagram
   matches the i-th secondary one when everything after the IP header is
   equal (IP ID, TTL and IP checksum do not count).  Different ->
   "net-mismatch udp" / "net-mismatch icmp" / "net-mismatch other", then
   held like TCP until `checkpoint`.
4. A held frame older than `timeout` -> RequestCheckpoint("net-timeout").
5. More than `max_queue` frames held on one connection ->
   RequestCheckpoint("net-queue-full"); at 2 * `max_queue` further primary
   frames of it are dropped (TCP retransmits).  Secondary buffers are
   bounded too: beyond them the oldest SVM data is dropped (it only happens
   when the SVM runs far ahead; the comparison then stalls into a timeout).
6. One request at a time: after a RequestCheckpoint, or after
   `checkpoint_started`, no other until `checkpoint`.
7. `alone()`: the secondary is gone; everything held is released and from
   then on primary frames go out at once and secondary frames are dropped.

Ownership: the core keeps references to the primary frames it holds and
gives the same objects back in `Release`; the caller must not reuse their
buffers.  Secondary frames are copied as needed, so their buffers may be.

Comparisons are whole-buffer (`bytearray` against `memoryview`, which is a
memcmp; `memoryview == memoryview` compares item by item and is 40x slower),
so per-frame work is O(frame) with no Python loop per byte.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvmcolo import packets
from kvmcolo.packets import PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, seq_add, seq_diff

# A timeout must outlast one checkpoint's stop + transfer + load (typically
# tens to a few hundred ms here), or the frames held across one checkpoint
# would time out and cause the next one.  QEMU uses 3 s because its periodic
# checkpoints are rare; here they are frequent, so a difference that the
# guests will never reconcile (a timer, a random number) should cost at
# most half a second of latency, not three.
DEFAULT_COMPARE_TIMEOUT = 0.5  # seconds
DEFAULT_MAX_QUEUE = 1024  # held primary frames per connection (QEMU's default)
# The SVM can run ahead of the PVM by at most what its peer's receive
# window lets it send; Linux windows stay below a few MiB.
DEFAULT_MAX_SECONDARY_BYTES = 8 << 20  # per TCP connection
IDLE_TIMEOUT = 60.0  # seconds without frames before a connection's state is dropped
_PRUNE_INTERVAL = 1.0  # idle pruning walks every connection, so not on every tick
_MAX_SVM_SYNS = 16  # SYN(-ACK) retransmissions the SVM may be ahead by
_SYN_KEY = TCP_SYN | TCP_ACK


@dataclass(frozen=True)
class Release:
    """Send this primary frame to the LAN now."""

    frame: bytes


@dataclass(frozen=True)
class RequestCheckpoint:
    """Take a checkpoint; `reason` is e.g. "net-mismatch tcp" or "net-timeout"."""

    reason: str


class _Held:
    """One held primary frame.  `done` is set when it is released; the
    arrival-order queue of all held frames forgets done entries lazily."""

    __slots__ = ("pkt", "epoch", "since", "born", "conn", "done")

    def __init__(self, pkt: packets.Packet, epoch: int, since: float, conn):
        self.pkt, self.epoch, self.since, self.conn, self.done = pkt, epoch, since, conn, False
        self.born = since  # `since` restarts at a checkpoint (timeouts); `born` does not (hold-time figures)


class _Tcp:
    """One TCP connection: the primary's held segments, the SVM's output.

    Held segments are `ready` (compared, waiting for the SVM's ACK) followed
    by `pending` (not yet compared): comparison goes in send order and stops
    at the first segment that cannot be decided, so the compared ones are
    always a prefix."""

    __slots__ = ("key", "ready", "pending", "mismatched", "last", "cmp", "marks", "done_high", "done_ack", "p_syns",
                 "closed", "sbase", "sbuf", "sv_fin", "sv_syn", "sv_rst", "sv_ack")  # fmt: skip

    def __init__(self, key, now: float):
        self.key = key
        self.ready: deque[_Held] = deque()
        self.pending: deque[_Held] = deque()
        self.mismatched = False
        self.last = now
        self.new_primary()
        self.new_secondary(None)

    def new_primary(self) -> None:
        """Forget the primary's side (a new connection on the same 4-tuple)."""
        self.cmp: int | None = None  # compared mark: primary bytes below it are settled
        # [epoch, high, ack] per epoch not yet checkpointed: the cumulative
        # highest sequence end and ack the primary's frames reached
        self.marks: list[list] = []
        self.done_high: int | None = None  # the same, up to the last checkpoint
        self.done_ack: int | None = None
        # (seq, flags) of primary SYNs that are out (matched, or covered by a
        # checkpoint): a retransmission of one needs no new counterpart
        self.p_syns: set[tuple[int, int]] = set()
        self.closed = False  # the guest's FIN or RST matched

    def new_secondary(self, ack: int | None) -> None:
        """Forget the SVM's side (its output before a checkpoint, or an old
        connection's)."""
        self.sbase: int | None = None  # sequence number of sbuf[0]
        self.sbuf = bytearray()  # SVM bytes not yet compared
        self.sv_fin: int | None = None  # sequence number of the SVM's FIN
        self.sv_syn: deque[int] = deque()  # flags of SVM SYNs not yet matched
        self.sv_rst = 0  # SVM RSTs not yet matched
        self.sv_ack = ack  # the highest ack the SVM sent

    def held(self) -> int:
        return len(self.ready) + len(self.pending)


class _Fifo:
    """UDP, ICMP or another IP protocol between two endpoints: datagrams in order."""

    __slots__ = ("key", "kind", "pending", "sv", "mismatched", "last")

    def __init__(self, key, kind: str, now: float):
        self.key, self.kind = key, kind
        self.pending: deque[_Held] = deque()
        self.sv: deque[bytearray] = deque()  # SVM datagrams (after the IP header) not yet matched
        self.mismatched = False
        self.last = now

    def held(self) -> int:
        return len(self.pending)


_WAIT, _MATCH, _MISMATCH = 0, 1, 2


def _later(a: int | None, b: int) -> int:
    """The later of two sequence numbers (a may be unknown)."""
    return b if a is None or seq_diff(b, a) > 0 else a


def _head_equal(have: bytearray, want: memoryview, n: int) -> bool:
    """have[:n] == want[:n], where n = min(len(have), len(want)), without
    copying (bytearray methods take any buffer and use memcmp)."""
    return have.startswith(want) if n == len(want) else have == want[:n]


class Comparator:
    def __init__(self, timeout: float = DEFAULT_COMPARE_TIMEOUT, max_queue: int = DEFAULT_MAX_QUEUE, *,
                 max_secondary_bytes: int = DEFAULT_MAX_SECONDARY_BYTES, epoch: int = 0):  # fmt: skip
        self.timeout = timeout
        self.max_queue = max_queue
        self.max_secondary_bytes = max_secondary_bytes
        self._epoch = epoch  # the last checkpoint the secondary received (the start: the initial copy's)
        self._tcp: dict[tuple, _Tcp] = {}
        self._fifo: dict[tuple, _Fifo] = {}
        self._held: deque[_Held] = deque()  # every held frame in arrival order (done ones dropped lazily)
        self._early: deque[tuple[bytes, int]] = deque()  # SVM frames of a checkpoint not yet received
        # Connections that saw a frame since the last checkpoint: only they
        # (and those still holding frames) have anything to re-base.
        self._touched: dict = {}  # (a dict: ordered, so the actions' order is reproducible)
        self._requested = False  # a RequestCheckpoint is outstanding or a checkpoint is under way
        self._alone = False
        self._next_prune = None
        self._now = 0.0  # the latest `now` any event brought
        self._holds: deque[float] = deque(maxlen=1024)  # how long recently released frames were held
        self.counters: dict[str, int] = dict.fromkeys(
            ("released", "matched", "held", "dropped_primary", "dropped_secondary", "dropped_secondary_bytes",
             "passthrough", "checkpoints", "released_by_checkpoint", "mismatch_tcp", "mismatch_udp",
             "mismatch_icmp", "mismatch_other", "timeouts", "queue_full", "requests", "pruned"), 0)  # fmt: skip

    # ---- events ------------------------------------------------------------------------

    def primary(self, frame: bytes, epoch: int, now: float) -> list:
        """A frame the PVM sent."""
        self._now = now
        pkt = packets.parse(frame)
        if self._alone or packets.is_link_control(pkt):
            self.counters["passthrough" if not self._alone else "released"] += 1
            return [Release(frame)]
        if pkt.proto == PROTO_TCP:
            key = pkt.flow()
            conn = self._tcp.get(key)
            if conn is None:
                conn = self._tcp[key] = _Tcp(key, now)
            elif pkt.flags & TCP_SYN and not conn.held() and (pkt.seq, pkt.flags & _SYN_KEY) not in conn.p_syns:
                conn.new_primary()  # the 4-tuple is reused by a new connection
        else:
            conn = self._fifo_conn(pkt, now)
        conn.last = now
        self._touched[conn] = None
        if epoch < self._epoch:
            # Sent before a checkpoint that the secondary already has: the
            # SVM starts after it, so it is out already as far as it knows.
            if isinstance(conn, _Tcp):
                self._tcp_mark(conn, pkt, epoch, late=True)
                if pkt.flags & TCP_SYN:
                    conn.p_syns.add((pkt.seq, pkt.flags & _SYN_KEY))
            self.counters["released"] += 1
            return [Release(frame)]
        if conn.held() >= 2 * self.max_queue:
            self.counters["dropped_primary"] += 1
            return []
        entry = _Held(pkt, epoch, now, conn)
        conn.pending.append(entry)
        self._held.append(entry)
        self.counters["held"] += 1
        if isinstance(conn, _Tcp):
            self._tcp_mark(conn, pkt, epoch)
            actions = self._tcp_progress(conn)
        else:
            actions = self._fifo_progress(conn)
        if conn.held() > self.max_queue:
            actions += self._request("net-queue-full", "queue_full")
        return actions

    def secondary(self, frame: bytes, epoch: int, now: float) -> list:
        """A frame the SVM sent."""
        self._now = now
        if self._alone or epoch < self._epoch:
            self.counters["dropped_secondary"] += 1
            return []
        if epoch > self._epoch:
            # The SVM already runs from a checkpoint whose RECEIVED has not
            # reached us: keep it for checkpoint(epoch).
            if len(self._early) >= 2 * self.max_queue:
                self._early.popleft()
                self.counters["dropped_secondary"] += 1
            self._early.append((bytes(frame), epoch))
            return []
        pkt = packets.parse(frame)
        if packets.is_link_control(pkt):
            self.counters["dropped_secondary"] += 1
            return []
        if pkt.proto == PROTO_TCP:
            key = pkt.flow()
            conn = self._tcp.get(key)
            if conn is None:
                conn = self._tcp[key] = _Tcp(key, now)
            conn.last = now
            self._touched[conn] = None
            self._tcp_secondary(conn, pkt)
            return self._tcp_progress(conn)
        conn = self._fifo_conn(pkt, now)
        conn.last = now
        self._touched[conn] = None
        if len(conn.sv) >= self.max_queue:
            conn.sv.popleft()
            self.counters["dropped_secondary"] += 1
        conn.sv.append(bytearray(pkt.after_ip_header()))
        return self._fifo_progress(conn)

    def checkpoint_started(self) -> None:
        """A checkpoint is under way: it will settle whatever a request would."""
        self._requested = True

    def checkpoint(self, epoch: int, now: float) -> list:
        """The secondary has received checkpoint number `epoch`."""
        self._now = now
        if self._alone:
            return []
        self._requested = False
        if epoch <= self._epoch:
            # Not a newer checkpoint (a repeat): re-basing would throw away
            # the SVM output of the current one.  Held frames still time out.
            return []
        self.counters["checkpoints"] += 1
        self._epoch = epoch
        actions = []
        # What the checkpoint includes goes out, in arrival order.
        still = deque()
        for entry in self._held:
            if entry.done:
                continue
            if entry.epoch < epoch:
                self.counters["released_by_checkpoint"] += 1
                self._release(entry, actions)
                if entry.pkt.flags & TCP_SYN and isinstance(entry.conn, _Tcp):
                    entry.conn.p_syns.add((entry.pkt.seq, entry.pkt.flags & _SYN_KEY))
            else:
                entry.since = now
                still.append(entry)
        self._held = still
        touched = self._touched
        touched.update(dict.fromkeys(entry.conn for entry in still))
        self._touched = {}
        for conn in touched:
            conn.mismatched = False
            conn.pending = deque(e for e in conn.pending if not e.done)
            if isinstance(conn, _Tcp):
                conn.ready = deque(e for e in conn.ready if not e.done)
                self._tcp_rebase(conn, epoch)
            else:
                conn.sv.clear()
        for conn in touched:
            progress = self._tcp_progress if isinstance(conn, _Tcp) else self._fifo_progress
            actions += progress(conn)
        # SVM output of this checkpoint that arrived before we heard of it.
        early, self._early = self._early, deque()
        for frame, e in early:
            if e < epoch:
                self.counters["dropped_secondary"] += 1
            elif e == epoch:
                actions += self.secondary(frame, e, now)
            else:
                self._early.append((frame, e))
        return actions

    def tick(self, now: float) -> list:
        """Called every ~10 ms: timeouts, and now and then idle pruning."""
        self._now = now
        if self._alone:
            return []
        held = self._held
        while held and held[0].done:
            held.popleft()
        actions = []
        if held and now - held[0].since > self.timeout:
            actions += self._request("net-timeout", "timeouts")
        if self._next_prune is None or now >= self._next_prune:
            self._next_prune = now + _PRUNE_INTERVAL
            self._prune(now)
        return actions

    def alone(self) -> list:
        """The secondary is gone: release everything held, compare nothing more."""
        actions = []
        for entry in self._held:
            if not entry.done:
                self._release(entry, actions)
        self._held.clear()
        self._tcp.clear()
        self._fifo.clear()
        self._touched.clear()
        self.counters["dropped_secondary"] += len(self._early)
        self._early.clear()
        self._alone = True
        return actions

    def stats(self) -> dict:
        s = dict(self.counters)
        s["connections"] = len(self._tcp) + len(self._fifo)
        s["tcp_connections"] = len(self._tcp)
        s["epoch"] = self._epoch
        s["alone"] = self._alone
        # How long the primary's output waited for the secondary's (the latency COLO adds), recent frames.
        holds = sorted(self._holds)
        s["hold_ms_p50"] = round(holds[len(holds) // 2] * 1e3, 3) if holds else None
        s["hold_ms_p99"] = round(holds[int(0.99 * (len(holds) - 1))] * 1e3, 3) if holds else None
        return s

    # ---- common ------------------------------------------------------------------------

    def _request(self, reason: str, counter: str | None = None) -> list:
        """Mismatches are counted where they are found; timeouts and full
        queues only when they cause a request (they persist until then)."""
        if self._requested or self._alone:
            return []
        self._requested = True
        if counter:
            self.counters[counter] += 1
        self.counters["requests"] += 1
        return [RequestCheckpoint(reason)]

    def _release(self, entry: _Held, actions: list) -> None:
        entry.done = True
        self._holds.append(self._now - entry.born)
        self.counters["released"] += 1
        self.counters["held"] -= 1
        actions.append(Release(entry.pkt.frame))

    def _mismatch(self, conn, kind: str) -> list:
        conn.mismatched = True
        self.counters["mismatch_" + kind] += 1
        return self._request("net-mismatch " + kind)

    def _prune(self, now: float) -> None:
        for table in (self._tcp, self._fifo):
            idle = [key for key, conn in table.items() if not conn.held() and now - conn.last > IDLE_TIMEOUT]
            for key in idle:
                del table[key]
            self.counters["pruned"] += len(idle)

    # ---- UDP, ICMP, other ---------------------------------------------------------------

    def _fifo_conn(self, pkt: packets.Packet, now: float) -> _Fifo:
        if pkt.proto == PROTO_UDP:
            key, kind = pkt.flow(), "udp"
        elif pkt.proto in (PROTO_ICMP, PROTO_ICMPV6):
            key, kind = (pkt.proto, pkt.src, pkt.dst), "icmp"
        else:
            key, kind = ("ip", pkt.src, pkt.dst), "other"
        conn = self._fifo.get(key)
        if conn is None:
            conn = self._fifo[key] = _Fifo(key, kind, now)
        return conn

    def _fifo_progress(self, conn: _Fifo) -> list:
        actions = []
        if conn.mismatched:
            return actions
        while conn.pending and conn.sv and conn.pending[0].epoch <= self._epoch:
            entry = conn.pending[0]
            theirs = conn.sv.popleft()
            if theirs != entry.pkt.after_ip_header():
                return actions + self._mismatch(conn, conn.kind)
            conn.pending.popleft()
            self.counters["matched"] += 1
            self._release(entry, actions)
        return actions

    # ---- TCP -----------------------------------------------------------------------------

    def _tcp_mark(self, conn: _Tcp, pkt: packets.Packet, epoch: int, late: bool = False) -> None:
        """Record how far the primary's stream and acks got in `epoch`: the
        checkpoint re-bases the comparison there."""
        end = seq_add(pkt.seq, pkt.payload_len + bool(pkt.flags & TCP_SYN) + bool(pkt.flags & TCP_FIN))
        ack = pkt.ack if pkt.flags & TCP_ACK else None
        if late:
            # Part of a checkpoint already taken: the SVM starts after it.
            conn.done_high = _later(conn.done_high, end)
            if ack is not None:
                conn.done_ack = _later(conn.done_ack, ack)
                conn.sv_ack = _later(conn.sv_ack, ack)
            if conn.cmp is not None and seq_diff(end, conn.cmp) > 0:
                conn.cmp = end
                self._tcp_align(conn)
            return
        if not conn.marks or conn.marks[-1][0] < epoch:
            prev = conn.marks[-1] if conn.marks else (None, conn.done_high, conn.done_ack)
            conn.marks.append([epoch, prev[1], prev[2]])
        mark = conn.marks[-1]
        mark[1] = _later(mark[1], end)
        if ack is not None:
            mark[2] = _later(mark[2], ack)

    def _tcp_rebase(self, conn: _Tcp, epoch: int) -> None:
        """After checkpoint(epoch): the SVM restarts from the primary's
        position at capture, with what it had acknowledged by then."""
        while conn.marks and conn.marks[0][0] < epoch:
            _, conn.done_high, conn.done_ack = conn.marks.pop(0)
        conn.new_secondary(conn.done_ack)
        if conn.done_high is not None:
            conn.cmp = conn.done_high

    def _tcp_align(self, conn: _Tcp) -> None:
        """Drop SVM bytes below the compared mark."""
        if conn.sbase is None or conn.cmp is None:
            return
        d = seq_diff(conn.cmp, conn.sbase)
        if d > 0:
            del conn.sbuf[:d]
            conn.sbase = conn.cmp
        # d < 0: the SVM's bytes start past the mark; the SVM sends in order,
        # so the gap will not fill: the comparison stalls into a timeout.

    def _tcp_secondary(self, conn: _Tcp, pkt: packets.Packet) -> None:
        flags = pkt.flags
        if flags & TCP_SYN:
            # A new connection (or the same SYN again): nothing the SVM sent
            # before belongs to it, and acks start again from its ISN.
            syns = conn.sv_syn
            conn.new_secondary(pkt.ack if flags & TCP_ACK else None)
            conn.sv_syn = syns
            if len(syns) >= _MAX_SVM_SYNS:
                syns.popleft()
            syns.append(flags & _SYN_KEY)
            return
        if flags & TCP_ACK:
            conn.sv_ack = _later(conn.sv_ack, pkt.ack)
        if flags & TCP_RST:
            conn.sv_rst = min(conn.sv_rst + 1, _MAX_SVM_SYNS)
            return
        n = pkt.payload_len
        if n:
            self._tcp_svm_data(conn, pkt.seq, pkt.tcp_payload())
        if flags & TCP_FIN and conn.sv_fin is None:
            conn.sv_fin = seq_add(pkt.seq, n)

    def _tcp_svm_data(self, conn: _Tcp, seq: int, data: memoryview) -> None:
        if conn.sbase is None:
            conn.sbase = conn.cmp if conn.cmp is not None else seq
        d = seq_diff(seq, seq_add(conn.sbase, len(conn.sbuf)))  # where it starts, from the buffer's end
        if d > 0:
            if conn.sbuf:
                # A hole inside the SVM's output that it will not fill (it
                # sends in order): what follows is useless for comparing.
                self.counters["dropped_secondary"] += 1
                return
            # Nothing buffered: start here.  If that is past the compared
            # mark, comparing waits (and times out) unless the mark gets
            # here, e.g. through a late primary frame of an older epoch.
            conn.sbase, d = seq, 0
        if -d >= len(data):
            return  # a retransmission of what is buffered or compared already
        conn.sbuf += data[-d:]
        excess = len(conn.sbuf) - self.max_secondary_bytes
        if excess > 0:
            del conn.sbuf[:excess]
            conn.sbase = seq_add(conn.sbase, excess)
            self.counters["dropped_secondary_bytes"] += excess

    def _tcp_progress(self, conn: _Tcp) -> list:
        """Compare what can be compared, release what may go."""
        actions = []
        if conn.mismatched:
            return actions
        while conn.pending:
            entry = conn.pending[0]
            if entry.epoch > self._epoch:
                break  # its SVM counterpart comes after a checkpoint not yet received
            verdict = self._tcp_compare(conn, entry.pkt)
            if verdict == _WAIT:
                break
            if verdict == _MISMATCH:
                return actions + self._mismatch(conn, "tcp")
            conn.pending.popleft()
            conn.ready.append(entry)
            self.counters["matched"] += 1
        ack = conn.sv_ack
        while conn.ready:
            pkt = conn.ready[0].pkt
            if pkt.flags & TCP_ACK and (ack is None or seq_diff(ack, pkt.ack) < 0):
                break  # acknowledges data that the SVM has not acknowledged yet
            self._release(conn.ready.popleft(), actions)
        if conn.closed and not conn.held() and self._tcp.get(conn.key) is conn:
            del self._tcp[conn.key]
        return actions

    def _tcp_compare(self, conn: _Tcp, pkt: packets.Packet) -> int:
        flags = pkt.flags
        if flags & TCP_RST:
            if not conn.sv_rst:
                return _WAIT
            conn.sv_rst -= 1
            conn.closed = True
            return _MATCH
        if flags & TCP_SYN:
            key = flags & _SYN_KEY
            if (pkt.seq, key) in conn.p_syns:
                return _MATCH  # a retransmission
            if not conn.sv_syn:
                return _WAIT
            if conn.sv_syn.popleft() != key:
                return _MISMATCH
            conn.sv_syn.clear()  # the rest are the SVM's retransmissions of it
            conn.p_syns.add((pkt.seq, key))
            if conn.cmp is None:
                conn.cmp = seq_add(pkt.seq, 1)
                self._tcp_align(conn)
            return _MATCH
        plen = pkt.payload_len
        if not plen and not flags & TCP_FIN:
            return _MATCH  # a pure ACK: says nothing the peer can hold the SVM to
        if conn.cmp is None:
            conn.cmp = pkt.seq  # joined mid-stream (state was pruned, or started late)
            self._tcp_align(conn)
        off = seq_diff(pkt.seq, conn.cmp)
        if off > 0:
            return _WAIT  # a hole before it (frames dropped here): wait for the retransmission or a checkpoint
        if -off < plen:
            want = pkt.tcp_payload()[-off:]
            have = conn.sbuf if conn.sbase == conn.cmp else bytearray()
            n = min(len(want), len(have))
            if n:
                if not _head_equal(have, want, n):
                    return _MISMATCH
                del have[:n]  # compared bytes are settled: the mark moves past them
                conn.cmp = conn.sbase = seq_add(conn.cmp, n)
            if n < len(want):
                if conn.sv_fin is not None and seq_diff(conn.sv_fin, conn.cmp) <= 0:
                    return _MISMATCH  # the SVM ended its stream where the PVM goes on
                return _WAIT
        if flags & TCP_FIN:
            fin = seq_add(pkt.seq, plen)
            if seq_diff(fin, conn.cmp) < 0:
                conn.closed = True
                return _MATCH  # compared already (or in a checkpoint): a retransmission
            if conn.sbase == conn.cmp and conn.sbuf:
                return _MISMATCH  # the PVM ends its stream where the SVM sent data
            if conn.sv_fin is None:
                return _WAIT
            if conn.sv_fin != fin:
                return _MISMATCH
            conn.cmp = seq_add(fin, 1)
            conn.sbase = conn.cmp
            conn.closed = True
        return _MATCH
