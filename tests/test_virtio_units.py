"""virtio-mmio transport, split virtqueues, virtio-blk and virtio-net driven
through crafted rings in real guest memory (no KVM needed): the protocol,
and every way a guest can misbehave."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from kvmcolo.devices import virtio_mmio as vm
from kvmcolo.devices.virtio_blk import BlockImage, VirtioBlock
from kvmcolo.devices.virtio_net import VirtioNet
from kvmcolo.errors import UserError
from kvmcolo.event_loop import EventLoop
from kvmcolo.memory import GuestMemory, bitmap_pages
from virtio_driver import F_INDIRECT, F_NEXT, F_WRITE, RingDriver

BUF = 0x200000  # data buffers live here


@pytest.fixture
def mem():
    m = GuestMemory(8 << 20)
    yield m
    m.close()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 16 * 64)  # 256 KiB, recognisable contents
    return path


class Irq:
    def __init__(self):
        self.levels = []

    def __call__(self, level):
        self.levels.append(level)

    @property
    def high(self):
        return bool(self.levels) and self.levels[-1]


def blk_setup(mem, disk, readonly=False):
    irq = Irq()
    dev = VirtioBlock(BlockImage(str(disk), readonly))
    t = vm.VirtioMmio("blk", dev, mem, irq)
    d = RingDriver(mem, t)
    assert d.init()
    return d, t, dev, irq


def blk_request(d, rtype, sector, data_len=0, out=b""):
    mem = d.mem
    hdr = d.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    bufs = [(hdr, 16, False)]
    if out:
        at = d.alloc(len(out))
        mem.write(at, out)
        bufs.append((at, len(out), False))
    data = None
    if data_len:
        data = d.alloc(data_len)
        bufs.append((data, data_len, True))
    status = d.alloc(1)
    mem.write(status, b"\xee")
    bufs.append((status, 1, True))
    d.submit(0, bufs)
    return mem.read(status, 1)[0], (mem.read(data, data_len) if data else b"")


# ---- transport -------------------------------------------------------------------


def test_identity_registers(mem, disk):
    d, t, _, _ = blk_setup(mem, disk)
    assert d.r(vm.MAGIC_VALUE) == 0x74726976 and d.r(vm.VERSION_REG) == 2 and d.r(vm.DEVICE_ID) == 2
    assert d.r(vm.QUEUE_NUM_MAX) == 256
    assert t.io_read(0x100, 4) | (t.io_read(0x104, 4) << 32) == 512  # capacity in sectors


def test_features_without_version_1_are_refused(mem, disk):
    dev = VirtioBlock(BlockImage(str(disk)))
    d = RingDriver(mem, vm.VirtioMmio("blk", dev, mem, Irq()))
    assert not d.init(features=0)  # legacy driver: FEATURES_OK does not stick
    assert not d.init(features=vm.VIRTIO_F_VERSION_1 | (1 << 28))  # a feature not offered


def test_interrupt_and_ack(mem, disk):
    d, t, _, irq = blk_setup(mem, disk)
    status, _ = blk_request(d, 0, 0, 512)
    assert status == 0 and irq.high and d.r(vm.INTERRUPT_STATUS) == vm.INT_USED_BUFFER
    d.w(vm.INTERRUPT_ACK, vm.INT_USED_BUFFER)
    assert not irq.high and d.r(vm.INTERRUPT_STATUS) == 0


def test_notify_before_driver_ok_is_ignored(mem, disk):
    dev = VirtioBlock(BlockImage(str(disk)))
    t = vm.VirtioMmio("blk", dev, mem, Irq())
    d = RingDriver(mem, t)
    assert d.init(driver_ok=False)
    hdr = d.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    st = d.alloc(1)
    d.submit(0, [(hdr, 16, False), (st, 1, True)])
    assert d.used(0) == [] and not t.status & vm.NEEDS_RESET


def test_notify_from_an_mmio_exit_is_served_where_the_machine_says(mem, disk):
    """The machine passes its I/O loop: a guest's QueueNotify write (a vCPU
    thread) only hands the work over; it is done when the loop runs it."""
    served = []
    t = vm.VirtioMmio("blk", VirtioBlock(BlockImage(str(disk))), mem, Irq(), serve_notify=served.append)
    d = RingDriver(mem, t)
    assert d.init()
    hdr, st = d.alloc(16), d.alloc(1)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    d.submit(0, [(hdr, 16, False), (st, 1, True)], notify=False)
    d.w(vm.QUEUE_NOTIFY, 0)  # what a guest's notify becomes without an ioeventfd
    assert d.used(0) == [] and len(served) == 1  # nothing done on the writing thread
    served.pop()()
    assert len(d.used(0)) == 1 and mem.read(st, 1) == b"\0"


def test_queue_size_not_power_of_two_needs_reset(mem, disk):
    dev = VirtioBlock(BlockImage(str(disk)))
    irq = Irq()
    t = vm.VirtioMmio("blk", dev, mem, irq)
    d = RingDriver(mem, t)
    d.init(queue_sizes=(100,))
    assert t.status & vm.NEEDS_RESET and d.r(vm.INTERRUPT_STATUS) & vm.INT_CONFIG_CHANGE and irq.high
    d.w(vm.STATUS, 0)  # reset recovers the device
    assert t.status == 0 and d.init() and blk_request(d, 0, 0, 512)[0] == 0


def test_queue_rings_outside_ram_need_reset(mem, disk):
    dev = VirtioBlock(BlockImage(str(disk)))
    t = vm.VirtioMmio("blk", dev, mem, Irq())
    d = RingDriver(mem, t)
    d.init(queue_sizes=(), driver_ok=False)
    d.setup_queue(0, 8, desc=1 << 40)
    assert t.status & vm.NEEDS_RESET


# ---- crafted bad chains: the device stops, nothing is written --------------------


def bad_chain(d, q, kind):
    mem = d.mem
    hdr = d.alloc(16)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    st = d.alloc(1)
    if kind == "oob":
        d.put_desc(q, 0, hdr, 16, F_NEXT, 1)
        d.put_desc(q, 1, 1 << 46, 512, F_WRITE | F_NEXT, 2)
        d.put_desc(q, 2, st, 1, F_WRITE, 0)
    elif kind == "loop":
        d.put_desc(q, 0, hdr, 16, F_NEXT, 1)
        d.put_desc(q, 1, st, 1, F_WRITE | F_NEXT, 0)
    elif kind == "badnext":
        d.put_desc(q, 0, hdr, 16, F_NEXT, 200)
    elif kind == "hugelen":
        d.put_desc(q, 0, hdr, 16, F_NEXT, 1)
        d.put_desc(q, 1, BUF, 0xFFFFFFF0, F_WRITE | F_NEXT, 2)
        d.put_desc(q, 2, st, 1, F_WRITE, 0)
    elif kind == "order":
        d.put_desc(q, 0, st, 1, F_WRITE | F_NEXT, 1)
        d.put_desc(q, 1, hdr, 16, 0, 0)
    elif kind == "indirect":
        d.put_desc(q, 0, hdr, 16, F_INDIRECT, 0)
    elif kind == "nohdr":
        d.put_desc(q, 0, st, 1, F_WRITE, 0)
    d.publish(q, 0)


@pytest.mark.parametrize("kind", ["oob", "loop", "badnext", "hugelen", "order", "indirect", "nohdr"])
def test_bad_chain_sets_needs_reset_and_writes_nothing(mem, disk, kind, caplog):
    d, t, _, irq = blk_setup(mem, disk)
    before = mem.read(d.queues[0]["used"], 6 + 8 * 8)
    bad_chain(d, 0, kind)
    assert t.status & vm.NEEDS_RESET
    assert d.r(vm.INTERRUPT_STATUS) & vm.INT_CONFIG_CHANGE and irq.high
    assert mem.read(d.queues[0]["used"], 6 + 8 * 8) == before  # no used entry
    assert len([r for r in caplog.records if "needs reset" in r.getMessage()]) == 1
    # Further notifications are ignored until a reset.
    t.notify(0)
    assert mem.read(d.queues[0]["used"], 6 + 8 * 8) == before


def test_avail_index_jump_needs_reset(mem, disk):
    d, t, _, _ = blk_setup(mem, disk)
    mem.write(d.queues[0]["avail"] + 2, struct.pack("<H", 500))
    t.notify(0)
    assert t.status & vm.NEEDS_RESET


# ---- virtio-blk -------------------------------------------------------------------


def test_blk_read_write_flush_get_id(mem, disk):
    d, t, dev, _ = blk_setup(mem, disk)
    status, data = blk_request(d, 0, 2, 1024)
    assert status == 0 and data == disk.read_bytes()[1024:2048]
    status, _ = blk_request(d, 1, 4, out=b"\xab" * 1536)
    assert status == 0 and disk.read_bytes()[2048 : 2048 + 1536] == b"\xab" * 1536
    assert blk_request(d, 4, 0)[0] == 0
    status, ident = blk_request(d, 8, 0, 20)
    assert status == 0 and ident.rstrip(b"\0") == b"disk.img"
    assert blk_request(d, 99, 0)[0] == 2  # unsupported
    assert [u[1] for u in d.used(0)] == [1025, 1, 1, 21, 1]
    assert dev.stats["reads"] == 1 and dev.stats["writes"] == 1


def test_blk_bounds_and_alignment(mem, disk):
    d, _, _, _ = blk_setup(mem, disk)
    assert blk_request(d, 0, 511, 1024)[0] == 1  # runs past the end
    assert blk_request(d, 0, 0, 100)[0] == 1  # not a whole sector
    assert blk_request(d, 1, 1 << 40, out=b"x" * 512)[0] == 1


def test_blk_read_only(mem, disk):
    d, t, dev, _ = blk_setup(mem, disk, readonly=True)
    assert dev.features & (1 << 5)
    before = disk.read_bytes()
    assert blk_request(d, 1, 0, out=b"\x00" * 512)[0] == 1
    assert disk.read_bytes() == before
    assert blk_request(d, 0, 0, 512)[0] == 0


def test_blk_reads_are_recorded_as_vmm_dirty(mem, disk):
    d, _, _, _ = blk_setup(mem, disk)
    mem.take_vmm_dirty()
    hdr, data, st = d.alloc(16), 0x300000, d.alloc(1)
    mem.write(hdr, struct.pack("<IIQ", 0, 0, 0))
    mem.take_vmm_dirty()
    d.submit(0, [(hdr, 16, False), (data, 8192, True), (st, 1, True)])
    dirty = bitmap_pages(mem.take_vmm_dirty()[0])
    assert 0x300 in dirty and 0x301 in dirty  # the data pages, written by the device


@pytest.mark.parametrize("size", [0, 1000])
def test_blk_image_size_must_be_whole_sectors(tmp_path, size):
    p = tmp_path / "odd.img"
    p.write_bytes(b"x" * size)
    with pytest.raises(UserError, match="multiple of 512"):
        BlockImage(str(p))


def test_blk_missing_image(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        BlockImage(str(tmp_path / "none.img"))


# ---- virtio-net (backend: a SOCK_SEQPACKET pair keeps frame boundaries) ------------


class SocketBackend:
    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def recv_into(self, views):
        return os.readv(self.sock.fileno(), views)

    def send(self, views):
        return os.writev(self.sock.fileno(), views)


@pytest.fixture
def net(mem):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loop = EventLoop()
    irq = Irq()
    dev = VirtioNet(SocketBackend(ours), bytes.fromhex("525400abcdef"), loop)
    t = vm.VirtioMmio("net", dev, mem, irq)
    d = RingDriver(mem, t)
    assert d.init(queue_sizes=(8, 8))
    loop.start()
    yield d, t, dev, theirs, loop
    loop.stop()
    ours.close()
    theirs.close()


def test_net_mac_in_config(net):
    d, t, *_ = net
    mac = bytes(t.io_read(0x100 + i, 1) for i in range(6))
    assert mac == bytes.fromhex("525400abcdef")


def test_net_transmit_strips_header(net):
    d, t, dev, peer, _ = net
    frame = bytes(range(60))
    at = d.alloc(12 + 60)
    d.mem.write(at, bytes(12) + frame)
    d.submit(1, [(at, 12, False), (at + 12, 60, False)])
    peer.settimeout(2)
    assert peer.recv(2000) == frame
    assert d.used(1) == [(0, 0)] and dev.stats["tx_frames"] == 1


def test_net_receive_waits_for_buffers(net):
    import time

    d, t, dev, peer, _ = net
    peer.send(b"\xaa" * 100)
    peer.send(b"\xbb" * 200)
    time.sleep(0.1)
    assert d.used(0) == []  # no buffers yet: frames wait in the backend
    bufs = [d.alloc(1526) for _ in range(2)]
    for b in bufs:
        d.submit(0, [(b, 1526, True)])
    deadline = time.time() + 2
    while len(d.used(0)) < 2 and time.time() < deadline:
        time.sleep(0.01)
    assert [u[1] for u in d.used(0)] == [112, 212]
    assert d.mem.read(bufs[0], 12) == bytes(10) + b"\x01\x00"
    assert d.mem.read(bufs[0] + 12, 100) == b"\xaa" * 100
    assert d.mem.read(bufs[1] + 12, 200) == b"\xbb" * 200


def test_net_received_frames_are_recorded_as_vmm_dirty(net):
    import time

    d, t, dev, peer, _ = net
    buf = 0x400000
    d.mem.take_vmm_dirty()
    d.submit(0, [(buf, 1526, True)])
    peer.send(b"\xcc" * 64)
    deadline = time.time() + 2
    while not d.used(0) and time.time() < deadline:
        time.sleep(0.01)
    dirty = bitmap_pages(d.mem.take_vmm_dirty()[0])
    assert 0x400 in dirty  # the frame's page
    assert d.queues[0]["used"] >> 12 in dirty  # and the used ring
