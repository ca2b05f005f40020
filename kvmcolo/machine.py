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

from kvmcolo import boot
from kvmcolo.cpuid import vcpu_cpuid
from kvmcolo.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from kvmcolo.devices.i8042 import I8042, I8042_COMMAND_PORT, I8042_DATA_PORT
from kvmcolo.devices.post_code import POST_CODE_PORT, PostCode
from kvmcolo.devices.serial import COM1_IRQ, COM1_PORT, Serial8250
from kvmcolo.errors import UserError
from kvmcolo.kvm_ffi import Kvm
from kvmcolo.vm import Vm, VmExit

log = logging.getLogger(__name__)

DEFAULT_MEM = 256 << 20
MIN_MEM = 2 << 20


@dataclass
class MachineConfig:
    kernel: str
    cmdline: str = ""
    mem_size: int = DEFAULT_MEM
    cpus: int = 1
    initrd: str | None = None
    serial_output: BinaryIO | None = None  # default: this process's stdout
    serial_input: bool = False  # feed stdin to the UART (interactive use)
    extra: dict = field(default_factory=dict)


class Machine:
    def __init__(self, config: MachineConfig, kvm: Kvm | None = None):
        self.config = config
        if config.mem_size < MIN_MEM or config.mem_size % 4096:
            raise UserError(f"--mem must be at least {MIN_MEM >> 20} MiB and a multiple of 4 KiB")
        image = boot.read_pvh_image(config.kernel)
        modules = []
        if config.initrd:
            try:
                with open(config.initrd, "rb") as f:
                    modules.append((config.initrd, f.read(), ""))
            except OSError as e:
                raise UserError(f"cannot read initrd {config.initrd!r}: {e.strerror}")

        self._owns_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = Vm(self.kvm, config.mem_size, config.cpus)
        try:
            self._add_devices()
            start_info = boot.load_pvh(self.vm.memory, image, config.cmdline, config.cpus, modules)
            self._setup_vcpus(image.entry, start_info)
        except BaseException:
            self.vm.close()
            raise
        self._stdin_thread: threading.Thread | None = None

    def _add_devices(self) -> None:
        out = self.config.serial_output
        if out is None:
            out = sys.stdout.buffer
        self.serial = Serial8250(out, lambda level: self.vm.set_irq_line(COM1_IRQ, level))
        self.debug_exit = DebugExit(self.vm.request_exit)
        self.i8042 = I8042(self.vm.request_exit)
        self.post_code = PostCode()
        bus = self.vm.pio_bus
        bus.register(COM1_PORT, 8, self.serial)
        bus.register(DEBUG_EXIT_PORT, 4, self.debug_exit)
        bus.register(I8042_DATA_PORT, I8042_COMMAND_PORT - I8042_DATA_PORT + 1, self.i8042)
        bus.register(POST_CODE_PORT, 1, self.post_code)

    def _setup_vcpus(self, entry: int, start_info: int) -> None:
        vcpus = self.vm.vcpus
        self.tsc_khz = vcpus[0].tsc_khz()
        supported = self.kvm.supported_cpuid()
        for v in vcpus:
            v.set_cpuid(vcpu_cpuid(supported, v.index, len(vcpus), self.tsc_khz))
        boot.pvh_boot_cpu_state(vcpus[0], entry, start_info)

    # ---- running ---------------------------------------------------------

    def start(self) -> None:
        self.vm.start()
        if self.config.serial_input and os.isatty(0):
            self._stdin_thread = threading.Thread(target=self._pump_stdin, name="serial-stdin", daemon=True)
            self._stdin_thread.start()

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

    def pause(self) -> None:
        self.vm.pause()

    def resume(self) -> None:
        self.vm.resume()

    def close(self) -> None:
        self.serial.flush()
        self.vm.close()
        if self._owns_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
