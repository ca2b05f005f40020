"""Layer 2: a whole machine — VM, devices and boot — assembled from a config.

This is what `kvmcolo run` starts and what the checkpoint and COLO layers
will drive.  It wires the standard PC devices onto the VM's buses, loads the
PVH kernel, gives every vCPU its CPUID and puts the boot CPU at the entry.
The other vCPUs stay in KVM's wait-for-SIPI state: the guest starts them
with INIT/SIPI through its local APIC, as on real hardware.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import BinaryIO

from kvmcolo import acpi, kernels
from kvmcolo.cpu_model import CpuModel
from kvmcolo.cpuid import vcpu_cpuid
from kvmcolo.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from kvmcolo.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from kvmcolo.devices.post_code import POST_CODE_PORT, PostCode
from kvmcolo.devices.rtc import RTC_PORT, CmosRtc
from kvmcolo.devices.serial import COM1_IRQ, COM1_PORT, Serial8250
from kvmcolo.devices.tap import TapBackend
from kvmcolo.devices.virtio_blk import BlockImage, VirtioBlock
from kvmcolo.devices.virtio_mmio import MMIO_WINDOW, VirtioMmio
from kvmcolo.devices.virtio_net import DEFAULT_MAC, VirtioNet, parse_mac
from kvmcolo.errors import UserError
from kvmcolo.event_loop import EventLoop
from kvmcolo.files import read_input
from kvmcolo.kvm_ffi import Kvm
from kvmcolo.run_state import OPERATOR, RunState
from kvmcolo.vm import Vm, VmExit

log = logging.getLogger(__name__)

DEFAULT_MEM = 256 << 20
MIN_MEM = 2 << 20

# virtio-mmio devices: one 4 KiB-spaced window each in the MMIO hole, and one
# GSI each (ISA-range lines the PC leaves free; 4 is COM1, 8 the RTC).
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_GSIS = [5, 6, 7, 9, 10, 11, 12, 14, 15] + list(range(16, 24))


@dataclass
class DiskSpec:
    path: str
    readonly: bool = False


@dataclass
class NetSpec:
    tap: str | None = None  # None: create a tap named kvmcoloN
    mac: str = DEFAULT_MAC
    bridge: str | None = None  # the host bridge the tap joins (the guest's way to the LAN)


@dataclass
class MachineConfig:
    kernel: str
    cmdline: str = ""
    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    initrd: str | None = None
    serial_output: BinaryIO | None = None  # default: this process's stdout
    serial_input: bool = False  # feed stdin to the UART (interactive use)
    disks: list[DiskSpec] = field(default_factory=list)
    nets: list[NetSpec] = field(default_factory=list)
    ioeventfd: bool = True  # queue notifications in the kernel (False: an MMIO exit each)
    cpu: CpuModel = CpuModel()  # the CPUID features the guest sees
    attach_bridges: bool = True  # False on a COLO secondary: its tap joins the bridge only at failover


class Machine:
    def __init__(self, config: MachineConfig, kvm: Kvm | None = None, boot_kernel: bool = True):
        """Build the machine.  boot_kernel=False builds it empty, to receive
        a snapshot or a checkpoint instead of booting."""
        self.config = config
        if config.mem_size < MIN_MEM or config.mem_size % 4096:
            raise UserError(f"--mem must be at least {MIN_MEM >> 20} MiB and a multiple of 4 KiB")
        image = kernels.read_kernel(config.kernel) if boot_kernel else None
        self.kernel_format = kernels.describe(image) if image is not None else None  # "PVH ELF, ..." or "bzImage, ..."
        initrd = (config.initrd, read_input(config.initrd, "initrd")) if config.initrd and image is not None else None

        if len(config.disks) + len(config.nets) > len(VIRTIO_GSIS):
            raise UserError(f"at most {len(VIRTIO_GSIS)} disks and network devices in all")
        self._owns_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = Vm(self.kvm, config.mem_size, config.cpus)
        self.loop = EventLoop()
        self.virtio: list[VirtioMmio] = []
        self.disk_images: list[BlockImage] = []
        self.taps: list[TapBackend] = []
        self._closables: list = []
        try:
            self._add_devices()
            cmdline = " ".join([config.cmdline, *self._add_virtio_devices()]).strip()
            self._setup_cpuid()
            if image is not None:
                kernels.load_and_start(image, self.vm.memory, self.vm.vcpus[0], cmdline, config.cpus, initrd,
                                       self.virtio_layout)  # fmt: skip
        except BaseException:
            self._close_devices()
            self.vm.close()
            raise
        self._stdin_thread: threading.Thread | None = None
        self.run_state = RunState(self._stop_guest, self._let_guest_run)
        self.dirty_log = None  # its one DirtyLog (layer 3): made by dirty_log.of(machine), read through its readers

    def _add_devices(self) -> None:
        out = self.config.serial_output
        if out is None:
            out = sys.stdout.buffer
        self.serial = Serial8250(out, lambda level: self.vm.set_irq_line(COM1_IRQ, level))
        self.debug_exit = DebugExit(self.vm.request_exit)
        self.i8042 = I8042(self.vm.request_exit)
        self.post_code = PostCode()
        self.rtc = CmosRtc()
        bus = self.vm.pio_bus
        bus.register(COM1_PORT, 8, self.serial)
        bus.register(DEBUG_EXIT_PORT, 4, self.debug_exit)
        bus.register(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1, self.i8042)
        bus.register(POST_CODE_PORT, 1, self.post_code)
        bus.register(RTC_PORT, 2, self.rtc)

    def _add_virtio_devices(self) -> list[str]:
        """Disks, then network devices.  Returns the command-line words that
        announce them (virtio_mmio.device=<size>@<base>:<gsi>, as Linux reads)."""
        words = []
        devices = []
        self.virtio_layout: list[acpi.MmioDevice] = []  # where each transport is, for the DSDT and MP table
        for spec in self.config.disks:
            image = BlockImage(spec.path, spec.readonly)
            self._closables.append(image)
            self.disk_images.append(image)
            devices.append((f"virtio-blk {spec.path}", VirtioBlock(image)))
        for spec in self.config.nets:
            mac = parse_mac(spec.mac)
            tap = TapBackend(spec.tap)
            self._closables.append(tap)
            self.taps.append(tap)
            if spec.bridge and self.config.attach_bridges:
                tap.join_bridge(spec.bridge)
            devices.append((f"virtio-net {tap.name}", VirtioNet(tap, mac, self.loop)))
        for i, (name, device) in enumerate(devices):
            base = VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_STRIDE
            gsi = VIRTIO_GSIS[i]
            irq = lambda level, gsi=gsi: self.vm.set_irq_line(gsi, level)  # noqa: E731
            transport = VirtioMmio(name, device, self.vm.memory, irq, serve_notify=self.loop.call_soon)
            self.vm.mmio_bus.register(base, MMIO_WINDOW, transport)
            if self.config.ioeventfd:
                for q in range(len(device.queue_sizes)):
                    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    self._closables.append(_Fd(efd))
                    self.vm.add_ioeventfd(base + transport.notify_offset(), 4, q, efd)
                    self.loop.add_reader(efd, lambda efd=efd, q=q, t=transport: _drain_and_notify(efd, t, q))
            self.virtio.append(transport)
            self.virtio_layout.append(acpi.MmioDevice(base, MMIO_WINDOW, gsi))
            words.append(f"virtio_mmio.device={MMIO_WINDOW}@{base:#x}:{gsi}")
        return words

    def _close_devices(self) -> None:
        self.loop.stop()
        for c in reversed(self._closables):
            c.close()
        self._closables = []

    def _setup_cpuid(self) -> None:
        vcpus = self.vm.vcpus
        self.tsc_khz = vcpus[0].tsc_khz()
        supported = self.kvm.supported_cpuid()
        for v in vcpus:
            table = vcpu_cpuid(supported, v.index, len(vcpus), self.tsc_khz)
            self.config.cpu.apply(table)
            v.set_cpuid(table)
            if v.index == 0:
                self.cpuid_table = table  # the CPU model as the guest sees it (vmstate.HostCaps.of)

    # ---- what the machine is, and its devices' state ----------------------

    def shape(self) -> dict:
        """Everything needed to build an identical empty machine elsewhere."""
        return {
            "mem_size": self.config.mem_size,
            "cpus": self.config.cpus,
            "disks": [{"path": os.path.abspath(d.path), "readonly": d.readonly, "size": img.size}
                      for d, img in zip(self.config.disks, self.disk_images)],
            "nets": [{"tap": tap.name, "mac": n.mac, "bridge": n.bridge} for n, tap in zip(self.config.nets, self.taps)],
            "ioeventfd": self.config.ioeventfd,
            "cpu": str(self.config.cpu),
        }  # fmt: skip

    @staticmethod
    def config_from_shape(shape: dict, **overrides) -> MachineConfig:
        config = MachineConfig(
            kernel="", mem_size=shape["mem_size"], cpus=shape["cpus"], ioeventfd=shape["ioeventfd"],
            cpu=CpuModel.parse(shape.get("cpu", "host")),  # snapshots from before --cpu: the host model
            disks=[DiskSpec(d["path"], d["readonly"]) for d in shape["disks"]],
            nets=[NetSpec(n["tap"], n["mac"], n.get("bridge")) for n in shape["nets"]],
        )  # fmt: skip
        for key, value in overrides.items():
            setattr(config, key, value)
        return config

    def net_devices(self) -> list[VirtioNet]:
        """The virtio-net devices, in --net order."""
        return [t.device for t in self.virtio if isinstance(t.device, VirtioNet)]

    def block_devices(self) -> list[VirtioBlock]:
        """The virtio-blk devices, in --disk order."""
        return [t.device for t in self.virtio if isinstance(t.device, VirtioBlock)]

    def swap_disk(self, index: int, path: str) -> None:
        """Disk `index` from now on reads and writes `path`, a view of the same
        bytes (the overlay a primary that becomes a secondary sees its image
        through).  Only with the guest held: the I/O thread is parked between
        requests, so no request straddles the two files."""
        if not self.paused:
            raise RuntimeError("swap_disk() of a running guest")
        old = self.disk_images[index]
        new = BlockImage(path, old.readonly)
        if new.size != old.size:
            new.close()
            raise UserError(f"{path!r} is {new.size} bytes, the disk it stands for {old.size}")
        self.block_devices()[index].image = new
        self.disk_images[index] = new
        self._closables[self._closables.index(old)] = new
        old.close()

    def save_devices(self) -> dict:
        return {"serial": self.serial.save_state(), "rtc": self.rtc.save_state(),
                "virtio": [t.save_state() for t in self.virtio]}  # fmt: skip

    def load_devices(self, state: dict) -> None:
        self.serial.load_state(state["serial"])
        if "rtc" in state:  # saved before the RTC existed: it keeps the host's time
            self.rtc.load_state(state["rtc"])
        if len(state["virtio"]) != len(self.virtio):
            raise ValueError(f"saved state has {len(state['virtio'])} virtio devices, this machine {len(self.virtio)}")
        for transport, saved in zip(self.virtio, state["virtio"]):
            transport.load_state(saved)

    # ---- running ---------------------------------------------------------

    def start(self) -> None:
        self.loop.start()
        self.vm.start()
        if self.config.serial_input and os.isatty(0):
            self._stdin_thread = threading.Thread(target=self._pump_stdin, name="serial-stdin", daemon=True)
            self._stdin_thread.start()

    def start_paused(self, reason: str = OPERATOR) -> None:
        """Start everything but hold the guest for `reason` (its release, or
        the operator's cont, lets it run)."""
        for v in self.vm.vcpus:
            v.request_pause()  # no guest instruction runs before the hold is in place
        self.start()
        if reason == OPERATOR:
            self.run_state.set_operator(True)
        else:
            self.run_state.hold(reason)

    def _pump_stdin(self) -> None:
        while self.vm.exit is None:
            try:
                data = os.read(0, 1024)
            except OSError:
                return
            if not data:
                return
            self.serial.feed(data)

    def wait(self, timeout: float | None = None) -> VmExit | None:
        return self.vm.wait(timeout)

    def run(self, timeout: float | None = None) -> VmExit | None:
        """Start, wait for the guest to end (or `timeout`), and return why it ended."""
        self.start()
        return self.wait(timeout)

    # The guest's run state has one owner, self.run_state: whoever needs the
    # guest stopped takes a hold there (hold/release/held, set_operator).

    def hold(self, reason: str) -> None:
        self.run_state.hold(reason)

    def release(self, reason: str) -> None:
        self.run_state.release(reason)

    def held(self, reason: str):
        """Context manager: the guest stopped for `reason` inside it."""
        return self.run_state.held(reason)

    @property
    def paused(self) -> bool:
        return self.run_state.stopped

    def _stop_guest(self) -> None:
        """Every vCPU parked, then the I/O thread held between requests, so
        no device has a request half done (run_state's stop action)."""
        self.vm.pause()
        self.loop.pause()

    def _let_guest_run(self) -> None:
        self.loop.resume()
        self.vm.resume()

    def close(self) -> None:
        self.serial.flush()
        self.loop.stop()  # first: a device callback must not raise an interrupt on a closed VM fd
        self.vm.close()
        self._close_devices()
        if self._owns_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Fd:
    def __init__(self, fd: int):
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def _drain_and_notify(efd: int, transport: VirtioMmio, queue: int) -> None:
    try:
        os.eventfd_read(efd)
    except BlockingIOError:
        return
    transport.notify(queue)
