"""Layer 2: the virtio-mmio transport (virtio 1.x, register layout version 2).

The transport owns the registers, the device status, feature negotiation, the
queues' configuration and the interrupt line.  A VirtioDevice (blk, net)
owns only its own backend and request processing, and is told when its queues
are live (activate), when one is notified, and when it is reset.

A guest that breaks the rules never hurts the VMM: a bad queue or request
makes the transport set DEVICE_NEEDS_RESET, raise a configuration-change
interrupt and log one line; the device then ignores the queues until the
driver resets it.  Notifications before DRIVER_OK are ignored (logged once).

Register writes arrive on vCPU threads (MMIO exits); queue notifications
arrive on the I/O thread (ioeventfd) — or on a vCPU thread when ioeventfd is
not in use.  One lock per transport orders them.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from kvmcolo.devices.virtqueue import QueueConfig, QueueError, Virtqueue
from kvmcolo.memory import GuestMemory

log = logging.getLogger(__name__)

MMIO_WINDOW = 0x200  # registers + config space
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B434C4F  # "KCLO"

# registers
MAGIC_VALUE, VERSION_REG, DEVICE_ID, VENDOR_ID_REG = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY = 0x030, 0x034, 0x038, 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS, INTERRUPT_ACK = 0x060, 0x064
STATUS = 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

# device status bits
ACKNOWLEDGE, DRIVER, DRIVER_OK, FEATURES_OK, NEEDS_RESET, FAILED = 1, 2, 4, 8, 0x40, 0x80
# interrupt status bits
INT_USED_BUFFER, INT_CONFIG_CHANGE = 1, 2

VIRTIO_F_VERSION_1 = 1 << 32


class VirtioDevice(Protocol):
    device_id: int
    features: int  # offered, VIRTIO_F_VERSION_1 included
    queue_sizes: list[int]  # max size of each queue

    def config_read(self, offset: int, size: int) -> int: ...

    def config_write(self, offset: int, size: int, value: int) -> None: ...

    def activate(self, transport: VirtioMmio, queues: list[Virtqueue]) -> None: ...

    def notify(self, queue: int) -> None: ...

    def reset(self) -> None: ...


class VirtioMmio:
    def __init__(self, name: str, device: VirtioDevice, memory: GuestMemory, set_irq: Callable[[bool], None],
                 serve_notify: Callable[[Callable[[], None]], None] | None = None):  # fmt: skip
        """`serve_notify(fn)`: where a queue notification written by the guest
        (an MMIO exit, on a vCPU thread) is served — the machine passes its
        I/O loop's call_soon, so device work never runs on or blocks a vCPU
        thread, as with ioeventfds.  None: at once, on the writing thread."""
        self.name = name
        self.device = device
        self.memory = memory
        self._set_irq = set_irq
        self._serve_notify = serve_notify
        self.lock = threading.RLock()
        self._early_notify_logged = False
        self._reset_registers()

    def _reset_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._queue_config = [QueueConfig() for _ in self.device.queue_sizes]
        self._queue_ready = [False] * len(self.device.queue_sizes)
        self.queues: list[Virtqueue | None] = [None] * len(self.device.queue_sizes)
        self.interrupt_status = 0
        self._config_generation = 0
        self._irq_level = False

    # ---- state the device and the VMM look at --------------------------------

    @property
    def live(self) -> bool:
        """The driver is running the device and the device is healthy."""
        return bool(self.status & DRIVER_OK) and not self.status & (NEEDS_RESET | FAILED)

    def fail(self, why: str) -> None:
        """The guest broke the rules: stop the device until the driver resets it."""
        with self.lock:
            if self.status & NEEDS_RESET:
                return
            log.warning("%s: %s; device needs reset", self.name, why)
            self.status |= NEEDS_RESET
            self.interrupt_status |= INT_CONFIG_CHANGE
            self._update_irq()

    def signal_used(self) -> None:
        """Tell the driver that used buffers are waiting (interrupt)."""
        with self.lock:
            self.interrupt_status |= INT_USED_BUFFER
            self._update_irq()

    def _update_irq(self) -> None:
        level = self.interrupt_status != 0
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # ---- bus side ---------------------------------------------------------------

    def io_read(self, offset: int, size: int) -> int:
        with self.lock:
            if offset >= CONFIG:
                return self.device.config_read(offset - CONFIG, size)
            if size != 4:
                return 0  # registers are 32-bit; the spec leaves other widths undefined
            q = self._queue_sel
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION_REG:
                return VERSION
            if offset == DEVICE_ID:
                return self.device.device_id
            if offset == VENDOR_ID_REG:
                return VENDOR_ID
            if offset == DEVICE_FEATURES:
                sel = self._device_features_sel
                return (self.device.features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
            if offset == QUEUE_NUM_MAX:
                return self.device.queue_sizes[q] if q < len(self.device.queue_sizes) else 0
            if offset == QUEUE_READY:
                return int(q < len(self._queue_ready) and self._queue_ready[q])
            if offset == INTERRUPT_STATUS:
                return self.interrupt_status
            if offset == STATUS:
                return self.status
            if offset == CONFIG_GENERATION:
                return self._config_generation
            return 0

    def io_write(self, offset: int, size: int, value: int) -> None:
        with self.lock:
            if offset >= CONFIG:
                self.device.config_write(offset - CONFIG, size, value)
                return
            if size != 4:
                return
            if offset == QUEUE_NOTIFY:
                if self._serve_notify is not None:
                    self._serve_notify(lambda: self.notify(value))
                else:
                    self._notify_locked(value)
            elif offset == STATUS:
                self._write_status(value & 0xFF)
            elif offset == INTERRUPT_ACK:
                self.interrupt_status &= ~value
                self._update_irq()
            elif offset == DEVICE_FEATURES_SEL:
                self._device_features_sel = value
            elif offset == DRIVER_FEATURES_SEL:
                self._driver_features_sel = value
            elif offset == DRIVER_FEATURES:
                if self.status & FEATURES_OK or self._driver_features_sel > 1:
                    return  # features are frozen once accepted
                shift = 32 * self._driver_features_sel
                self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)
            elif offset == QUEUE_SEL:
                self._queue_sel = value
            else:
                self._write_queue_register(offset, value)

    def _write_queue_register(self, offset: int, value: int) -> None:
        q = self._queue_sel
        if q >= len(self._queue_config):
            return
        if self._queue_ready[q] and offset != QUEUE_READY:
            return  # a live queue's configuration cannot change
        cfg = self._queue_config[q]
        if offset == QUEUE_NUM:
            cfg.size = value
        elif offset == QUEUE_DESC_LOW:
            cfg.desc_addr = (cfg.desc_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DESC_HIGH:
            cfg.desc_addr = (cfg.desc_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DRIVER_LOW:
            cfg.avail_addr = (cfg.avail_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DRIVER_HIGH:
            cfg.avail_addr = (cfg.avail_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_DEVICE_LOW:
            cfg.used_addr = (cfg.used_addr & ~0xFFFFFFFF) | value
        elif offset == QUEUE_DEVICE_HIGH:
            cfg.used_addr = (cfg.used_addr & 0xFFFFFFFF) | (value << 32)
        elif offset == QUEUE_READY:
            if value & 1:
                try:
                    self.queues[q] = Virtqueue(self.memory, cfg, self.device.queue_sizes[q])
                except QueueError as e:
                    self.fail(f"queue {q}: {e}")
                    return
                self._queue_ready[q] = True
            else:
                self._queue_ready[q] = False
                self.queues[q] = None

    def _write_status(self, value: int) -> None:
        if value == 0:
            self._reset()
            return
        if value & FEATURES_OK and not self.status & FEATURES_OK:
            offered = self.device.features
            if self.driver_features & ~offered or not self.driver_features & VIRTIO_F_VERSION_1:
                log.info("%s: driver features %#x refused (offered %#x)", self.name, self.driver_features, offered)
                value &= ~FEATURES_OK  # FEATURES_OK does not stick: the driver must give up
        if value & DRIVER_OK and not self.status & DRIVER_OK:
            if not value & FEATURES_OK:
                self.fail("DRIVER_OK without FEATURES_OK")
                return
            self.status = value | (self.status & NEEDS_RESET)
            if not self.status & NEEDS_RESET:
                self.device.activate(self, self.queues)
            return
        self.status = value | (self.status & NEEDS_RESET)

    def _reset(self) -> None:
        self.device.reset()
        self._reset_registers()
        self._set_irq(False)

    # ---- notifications -------------------------------------------------------------

    def notify(self, queue: int) -> None:
        """A queue notification (from the I/O thread's ioeventfd or an MMIO exit)."""
        with self.lock:
            self._notify_locked(queue)

    def _notify_locked(self, queue: int) -> None:
        if not self.status & DRIVER_OK:
            if not self._early_notify_logged:
                self._early_notify_logged = True
                log.warning("%s: queue notification before DRIVER_OK ignored (logged once)", self.name)
            return
        if not self.live or queue >= len(self.queues) or self.queues[queue] is None:
            return
        try:
            self.device.notify(queue)
        except QueueError as e:
            self.fail(f"queue {queue}: {e}")

    def notify_offset(self) -> int:
        return QUEUE_NOTIFY

    # ---- checkpoints ------------------------------------------------------------
    # Taken with the guest paused and the I/O thread held, so no request is in
    # flight: the queues' positions are the whole of the device's progress.

    def save_state(self) -> dict:
        with self.lock:
            return {
                "device_id": self.device.device_id,
                "status": self.status,
                "driver_features": self.driver_features,
                "device_features_sel": self._device_features_sel,
                "driver_features_sel": self._driver_features_sel,
                "queue_sel": self._queue_sel,
                "queues": [
                    {"size": c.size, "desc": c.desc_addr, "avail": c.avail_addr, "used": c.used_addr,
                     "ready": self._queue_ready[i],
                     "position": self.queues[i].save_state() if self.queues[i] is not None else None}
                    for i, c in enumerate(self._queue_config)
                ],  # fmt: skip
                "interrupt_status": self.interrupt_status,
                "config_generation": self._config_generation,
                "early_notify_logged": self._early_notify_logged,
            }

    def load_state(self, state: dict) -> None:
        """Become the saved transport: registers, queues, and (if the driver
        had the device running) the device's data path, re-activated."""
        with self.lock:
            if state["device_id"] != self.device.device_id:
                raise ValueError(f"{self.name}: saved state is for device id {state['device_id']}")
            self.device.reset()
            self._reset_registers()
            self.status = state["status"]
            self.driver_features = state["driver_features"]
            self._device_features_sel = state["device_features_sel"]
            self._driver_features_sel = state["driver_features_sel"]
            self._queue_sel = state["queue_sel"]
            self._early_notify_logged = state["early_notify_logged"]
            for i, q in enumerate(state["queues"]):
                cfg = self._queue_config[i]
                cfg.size, cfg.desc_addr, cfg.avail_addr, cfg.used_addr = q["size"], q["desc"], q["avail"], q["used"]
                if q["ready"]:
                    self.queues[i] = Virtqueue(self.memory, cfg, self.device.queue_sizes[i])
                    self.queues[i].load_state(q["position"])
                    self._queue_ready[i] = True
            self._config_generation = state["config_generation"]
            if self.live:
                self.device.activate(self, self.queues)
            self.interrupt_status = state["interrupt_status"]
            self._irq_level = self.interrupt_status != 0
            self._set_irq(self._irq_level)
