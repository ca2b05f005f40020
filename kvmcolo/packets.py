"""Layer 4: Ethernet frames as the network comparator and the sequence
rewriter see them — parsing, flow keys, in-place TCP field updates with
incremental checksums, and the frames a host sends to announce a guest.

Pure functions on bytes; no sockets.  Only what COLO needs is parsed:
IPv4 and IPv6 (fixed header; extension headers are treated as an unknown
protocol), TCP, UDP, ICMP.  Everything else is "not IP" (ARP, VLAN-tagged,
LLDP, ...) and the comparator passes it through.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IPV4 = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IPV6 = 0x86DD
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
BROADCAST = b"\xff" * 6

_TCP = struct.Struct("!HHIIBB")  # sport, dport, seq, ack, data offset, flags


@dataclass(slots=True)
class Packet:
    """One parsed frame.  Offsets index into `frame`; `proto` is None when
    the frame is not IP (or its IP header is unusable)."""

    frame: bytes | bytearray
    ethertype: int
    proto: int | None = None
    src: bytes = b""  # IP addresses (4 or 16 bytes)
    dst: bytes = b""
    l3: int = ETH_HLEN  # IP header offset
    l4: int = 0  # transport header offset
    end: int = 0  # end of the IP packet (frames can carry Ethernet padding)
    sport: int = 0
    dport: int = 0
    seq: int = 0  # TCP only from here on
    ack: int = 0
    flags: int = 0
    payload: int = 0  # offset of the TCP payload

    @property
    def is_ip(self) -> bool:
        return self.proto is not None

    @property
    def payload_len(self) -> int:
        return self.end - self.payload

    def tcp_payload(self) -> memoryview:
        return memoryview(self.frame)[self.payload : self.end]

    def after_ip_header(self) -> memoryview:
        """Transport header and payload: what UDP/ICMP comparison looks at."""
        return memoryview(self.frame)[self.l4 : self.end]

    def flow(self) -> tuple:
        """The connection as seen from the sender: (proto, src, sport, dst, dport)."""
        return (self.proto, self.src, self.sport, self.dst, self.dport)

    def reverse_flow(self) -> tuple:
        """The connection as seen from the receiver (for frames towards the guest)."""
        return (self.proto, self.dst, self.dport, self.src, self.sport)


def parse(frame: bytes | bytearray) -> Packet:
    """Never raises: anything malformed comes back as a non-IP packet (or an
    IP packet of unknown protocol), which the comparator handles whole."""
    n = len(frame)
    if n < ETH_HLEN:
        return Packet(frame, -1)
    ethertype = (frame[12] << 8) | frame[13]
    pkt = Packet(frame, ethertype)
    if ethertype == ETH_P_IPV4:
        if n < ETH_HLEN + 20 or frame[ETH_HLEN] >> 4 != 4:
            return pkt
        ihl = (frame[ETH_HLEN] & 0x0F) * 4
        total = (frame[ETH_HLEN + 2] << 8) | frame[ETH_HLEN + 3]
        if ihl < 20 or total < ihl or ETH_HLEN + total > n:
            return pkt
        frag = ((frame[ETH_HLEN + 6] << 8) | frame[ETH_HLEN + 7]) & 0x3FFF
        pkt.proto = frame[ETH_HLEN + 9] if not frag else 0  # fragments: compared whole
        pkt.src, pkt.dst = bytes(frame[ETH_HLEN + 12 : ETH_HLEN + 16]), bytes(frame[ETH_HLEN + 16 : ETH_HLEN + 20])
        pkt.l4, pkt.end = ETH_HLEN + ihl, ETH_HLEN + total
    elif ethertype == ETH_P_IPV6:
        if n < ETH_HLEN + 40 or frame[ETH_HLEN] >> 4 != 6:
            return pkt
        plen = (frame[ETH_HLEN + 4] << 8) | frame[ETH_HLEN + 5]
        if ETH_HLEN + 40 + plen > n:
            return pkt
        pkt.proto = frame[ETH_HLEN + 6]
        pkt.src, pkt.dst = bytes(frame[ETH_HLEN + 8 : ETH_HLEN + 24]), bytes(frame[ETH_HLEN + 24 : ETH_HLEN + 40])
        pkt.l4, pkt.end = ETH_HLEN + 40, ETH_HLEN + 40 + plen
    else:
        return pkt
    if pkt.proto == PROTO_TCP:
        if pkt.end - pkt.l4 < 20:
            pkt.proto = 0
            return pkt
        pkt.sport, pkt.dport, pkt.seq, pkt.ack, off, pkt.flags = _TCP.unpack_from(frame, pkt.l4)
        doff = (off >> 4) * 4
        if doff < 20 or pkt.l4 + doff > pkt.end:
            pkt.proto = 0
            return pkt
        pkt.payload = pkt.l4 + doff
    elif pkt.proto == PROTO_UDP:
        if pkt.end - pkt.l4 < 8:
            pkt.proto = 0
            return pkt
        pkt.sport, pkt.dport = struct.unpack_from("!HH", frame, pkt.l4)
    return pkt


# ICMPv6 that only keeps the link working: MLD (130-132, 143), router and
# neighbour discovery (133-136) and redirects (137).
_ICMPV6_LINK_CONTROL = frozenset({130, 131, 132, 133, 134, 135, 136, 137, 143})


def is_link_control(pkt: Packet) -> bool:
    """ARP and other non-IP frames, IPv6 neighbour discovery and MLD: each
    guest sends these on its own timers (random delays, retries), so the
    comparator passes the primary's and drops the secondary's, as with ARP."""
    if not pkt.is_ip:
        return True
    return pkt.proto == PROTO_ICMPV6 and pkt.end > pkt.l4 and pkt.frame[pkt.l4] in _ICMPV6_LINK_CONTROL


def seq_diff(a: int, b: int) -> int:
    """a - b in 32-bit sequence space, as a signed number."""
    d = (a - b) & 0xFFFFFFFF
    return d - (1 << 32) if d & 0x80000000 else d


def seq_add(a: int, n: int) -> int:
    return (a + n) & 0xFFFFFFFF


# ---- in-place TCP updates (RFC 1624 incremental checksum) -------------------------


def _csum_replace(frame: bytearray, csum_at: int, old: int, new: int) -> None:
    """The 16-bit one's-complement checksum at `csum_at` after a 32-bit field
    changed from `old` to `new`: HC' = ~(~HC + ~m + m') per 16-bit word."""
    hc = (frame[csum_at] << 8) | frame[csum_at + 1]
    s = (~hc & 0xFFFF) + (~(old >> 16) & 0xFFFF) + (~old & 0xFFFF) + (new >> 16) + (new & 0xFFFF)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    s = ~s & 0xFFFF
    frame[csum_at], frame[csum_at + 1] = s >> 8, s & 0xFF


def set_tcp_seq(frame: bytearray, pkt: Packet, seq: int) -> None:
    _set_tcp_word(frame, pkt, 4, pkt.seq, seq)
    pkt.seq = seq


def set_tcp_ack(frame: bytearray, pkt: Packet, ack: int) -> None:
    _set_tcp_word(frame, pkt, 8, pkt.ack, ack)
    pkt.ack = ack


def _set_tcp_word(frame: bytearray, pkt: Packet, field: int, old: int, new: int) -> None:
    struct.pack_into("!I", frame, pkt.l4 + field, new)
    _csum_replace(frame, pkt.l4 + 16, old, new)


def tcp_checksum_ok(frame: bytes | bytearray, pkt: Packet) -> bool:
    """Full TCP checksum check (tests and debugging; not on the hot path)."""
    segment = bytes(frame[pkt.l4 : pkt.end])
    if len(pkt.src) == 4:
        pseudo = pkt.src + pkt.dst + struct.pack("!BBH", 0, PROTO_TCP, len(segment))
    else:
        pseudo = pkt.src + pkt.dst + struct.pack("!IxxxB", len(segment), PROTO_TCP)
    return internet_checksum(pseudo + segment) == 0


def internet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# ---- announcing a guest on a new port (failover) -------------------------------------


def rarp_announce(mac: bytes) -> bytes:
    """What QEMU's announce-self sends: a broadcast RARP "request reverse"
    from the guest's MAC.  Switches and bridges learn the MAC's new port
    from its source address; no IP address is needed."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IPV4, 6, 4, 3, mac, bytes(4), mac, bytes(4))
    return (BROADCAST + mac + struct.pack("!H", ETH_P_RARP) + arp).ljust(60, b"\0")


def gratuitous_arp(mac: bytes, ip: bytes) -> bytes:
    """A broadcast ARP request for the guest's own IPv4 address: hosts that
    cache it refresh the entry, and switches learn the port."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IPV4, 6, 4, 1, mac, ip, bytes(6), ip)
    return (BROADCAST + mac + struct.pack("!H", ETH_P_ARP) + arp).ljust(60, b"\0")


def arp_sender(pkt: Packet) -> tuple[bytes, bytes] | None:
    """(MAC, IPv4) a frame's sender claims (from ARP), or None."""
    f = pkt.frame
    if pkt.ethertype != ETH_P_ARP or len(f) < ETH_HLEN + 28:
        return None
    return bytes(f[ETH_HLEN + 8 : ETH_HLEN + 14]), bytes(f[ETH_HLEN + 14 : ETH_HLEN + 18])


# ---- building frames (tests and benchmarks build what guests would send) ---------------


def build_tcp(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
              flags: int, payload: bytes = b"", window: int = 65535, ip_id: int = 0, ttl: int = 64,
              options: bytes = b"") -> bytearray:  # fmt: skip
    """An IPv4/TCP frame with correct checksums."""
    doff = 20 + len(options)
    tcp = bytearray(struct.pack("!HHIIBBHHH", sport, dport, seq, ack, (doff // 4) << 4, flags, window, 0, 0))
    tcp += options + payload
    pseudo = src + dst + struct.pack("!BBH", 0, PROTO_TCP, len(tcp))
    struct.pack_into("!H", tcp, 16, internet_checksum(pseudo + bytes(tcp)))
    return _ipv4_frame(src_mac, dst_mac, src, dst, PROTO_TCP, bytes(tcp), ip_id, ttl)


def build_udp(src_mac: bytes, dst_mac: bytes, src: bytes, dst: bytes, sport: int, dport: int, payload: bytes,
              ip_id: int = 0, ttl: int = 64) -> bytearray:  # fmt: skip
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    return _ipv4_frame(src_mac, dst_mac, src, dst, PROTO_UDP, udp, ip_id, ttl)


def _ipv4_frame(src_mac, dst_mac, src, dst, proto, body: bytes, ip_id: int, ttl: int) -> bytearray:
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ip_id, 0, ttl, proto, 0, src, dst))
    struct.pack_into("!H", ip, 10, internet_checksum(bytes(ip)))
    return bytearray(dst_mac + src_mac + struct.pack("!H", ETH_P_IPV4) + ip + body)
