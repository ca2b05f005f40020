"""Layer 2: virtio-blk backed by a raw image file.

Requests are served on the I/O thread straight between the image file and
guest RAM: preadv() into writable views of guest memory (marked dirty by
GuestMemory), pwritev() from read-only views — no intermediate copies.

Other layers can watch writes through `write_observers` (COLO forwards the
primary's writes to the secondary this way); a device knows nothing of COLO.
"""

from __future__ import annotations

import logging
import os
import struct
from typing import Callable

from kvmcolo.devices.virtio_mmio import VIRTIO_F_VERSION_1, VirtioMmio
from kvmcolo.buffers import split_views
from kvmcolo.devices.virtqueue import DescChain, QueueError, Virtqueue
from kvmcolo.errors import UserError

log = logging.getLogger(__name__)

DEVICE_ID_BLOCK = 2
SECTOR = 512
QUEUE_SIZE = 256

VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_FLUSH = 1 << 9

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20

_HEADER = struct.Struct("<IIQ")
_CONFIG = struct.Struct("<QII")  # capacity, size_max, seg_max


class BlockImage:
    """The raw image file behind a disk."""

    def __init__(self, path: str, readonly: bool = False):
        try:
            self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        except FileNotFoundError:
            raise UserError(f"disk image {path!r} does not exist")
        except IsADirectoryError:
            raise UserError(f"disk image {path!r} is a directory")
        except PermissionError:
            raise UserError(f"no permission to open disk image {path!r}{'' if readonly else ' for writing (add ,ro?)'}")
        except OSError as e:
            raise UserError(f"cannot open disk image {path!r}: {e.strerror}")
        size = os.fstat(self.fd).st_size
        if size == 0 or size % SECTOR:
            os.close(self.fd)
            raise UserError(f"disk image {path!r} is {size} bytes: its size must be a non-zero multiple of {SECTOR}")
        self.path = path
        self.readonly = readonly
        self.size = size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class VirtioBlock:
    device_id = DEVICE_ID_BLOCK
    queue_sizes = [QUEUE_SIZE]

    def __init__(self, image: BlockImage):
        self.image = image
        self.features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX
        if image.readonly:
            self.features |= VIRTIO_BLK_F_RO
        self._config = _CONFIG.pack(image.size // SECTOR, 0, QUEUE_SIZE - 2)
        self._transport: VirtioMmio | None = None
        self._queue: Virtqueue | None = None
        self.write_observers: list[Callable[[int, list[memoryview]], None]] = []
        self.stats = {"reads": 0, "writes": 0, "flushes": 0, "errors": 0, "bytes_read": 0, "bytes_written": 0}
        ident = os.path.basename(image.path).encode()[:ID_BYTES]
        self._id = ident + bytes(ID_BYTES - len(ident))

    # ---- VirtioDevice --------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size], "little") if offset < len(self._config) else 0

    def config_write(self, offset: int, size: int, value: int) -> None:
        pass  # nothing writable (no writeback-cache toggle offered)

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue | None]) -> None:
        self._transport = transport
        self._queue = queues[0]

    def reset(self) -> None:
        self._queue = None

    def notify(self, queue: int) -> None:
        q = self._queue
        if q is None:
            return
        served = 0
        while (chain := q.pop()) is not None:
            q.push(chain, self._serve(q, chain))
            served += 1
        if served and q.interrupt_wanted():
            self._transport.signal_used()

    # ---- requests ---------------------------------------------------------------

    def _serve(self, q: Virtqueue, chain: DescChain) -> int:
        """Serve one request; returns the bytes written into the chain."""
        readable = q.readable_views(chain)
        writable = q.writable_views(chain)
        if chain.readable_len < _HEADER.size or chain.writable_len < 1:
            # No room for the header or the status byte: a broken driver.
            raise QueueError("block request without a header or a status byte")
        header, data_out = split_views(readable, _HEADER.size)
        rtype, _, sector = _HEADER.unpack(b"".join(header))
        data_in, status_view = split_views(writable, chain.writable_len - 1)
        status, written = self._execute(rtype, sector, data_out, data_in)
        if status != S_OK:
            self.stats["errors"] += 1
        status_view[0][0] = status
        return written + 1

    def _execute(self, rtype: int, sector: int, data_out, data_in) -> tuple[int, int]:
        if rtype == T_IN:
            length = sum(len(v) for v in data_in)
            if not self._in_bounds(sector, length):
                return S_IOERR, 0
            try:
                n = os.preadv(self.image.fd, data_in, sector * SECTOR)
            except OSError as e:
                log.warning("%s: read at sector %d failed: %s", self.image.path, sector, e.strerror)
                return S_IOERR, 0
            self.stats["reads"] += 1
            self.stats["bytes_read"] += n
            return (S_OK if n == length else S_IOERR), n
        if rtype == T_OUT:
            length = sum(len(v) for v in data_out)
            if self.image.readonly or not self._in_bounds(sector, length):
                return S_IOERR, 0
            try:
                n = os.pwritev(self.image.fd, data_out, sector * SECTOR)
            except OSError as e:
                log.warning("%s: write at sector %d failed: %s", self.image.path, sector, e.strerror)
                return S_IOERR, 0
            self.stats["writes"] += 1
            self.stats["bytes_written"] += n
            for observe in self.write_observers:
                observe(sector * SECTOR, data_out)
            return (S_OK if n == length else S_IOERR), 0
        if rtype == T_FLUSH:
            if not self.image.readonly:
                try:
                    os.fdatasync(self.image.fd)
                except OSError as e:
                    log.warning("%s: flush failed: %s", self.image.path, e.strerror)
                    return S_IOERR, 0
            self.stats["flushes"] += 1
            return S_OK, 0
        if rtype == T_GET_ID:
            n = 0
            for v in data_in:
                chunk = self._id[n : n + len(v)]
                v[: len(chunk)] = chunk
                n += len(chunk)
            return S_OK, n
        return S_UNSUPP, 0

    def _in_bounds(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector * SECTOR + length <= self.image.size

