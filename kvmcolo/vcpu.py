"""Layer 2: one virtual CPU and the thread that runs it.

A vCPU is in one of four states, and the states enforce the rules:

    CREATED --start()--> RUNNING --pause()--> PAUSED --resume()--> RUNNING
                             \\________________ stop() ____________--> STOPPED

Register and state ioctls from other threads are only allowed in CREATED or
PAUSED (a vCPU ioctl blocks while KVM_RUN runs, and state read from a running
vCPU would be torn).

Pausing ("kicking") sets kvm_run.immediate_exit and sends the thread a
real-time signal with an empty handler.  If the thread is inside KVM_RUN the
signal makes it return -EINTR; if it is about to enter, immediate_exit makes
KVM_RUN return -EINTR at once.  Either way the vCPU parks only on that EINTR
return: a KVM_RUN with immediate_exit set first completes any port/MMIO read
still in flight, so a parked vCPU never has half an exit in its registers.
"""

from __future__ import annotations

import enum
import errno
import logging
import mmap
import os
import signal
import threading
from typing import Protocol

from kvmcolo.iobus import IoBus
from kvmcolo.kvm_ffi import EXIT_REASON_NAMES, KvmError, ffi, ioctl, lib, run_vcpu

log = logging.getLogger(__name__)

_kick_signal: int | None = None
_kick_lock = threading.Lock()

# Signals the main thread handles; vCPU threads block them so they are never
# the ones interrupted by a Ctrl-C or SIGTERM.
_MAIN_THREAD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD}

PAUSE_TIMEOUT_S = 5.0
REKICK_INTERVAL_S = 0.05


def kick_signal() -> int:
    """Install the kick signal's empty handler once per process."""
    global _kick_signal
    with _kick_lock:
        if _kick_signal is None:
            sig = lib.kvmcolo_install_kick_handler()
            if sig < 0:
                raise OSError(-sig, "cannot install the vCPU kick signal handler")
            _kick_signal = sig
        return _kick_signal


class VcpuState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class VcpuHost(Protocol):
    """What a vCPU needs from its VM."""

    pio_bus: IoBus
    mmio_bus: IoBus

    def request_exit(self, status: int, reason: str) -> None: ...

    def vcpu_failed(self, index: int, message: str) -> None: ...


class VcpuStateError(RuntimeError):
    pass


class Vcpu:
    def __init__(self, vm_fd: int, index: int, mmap_size: int, host: VcpuHost):
        self.index = index
        self.host = host
        self.fd = ioctl(vm_fd, lib.KVM_CREATE_VCPU, index, what=f"vcpu {index}")
        self._run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = memoryview(self._run_map)
        base = self._run_base = ffi.from_buffer(self._run_map)
        self.run = ffi.cast("struct kvm_run *", base)
        exit_union = base + lib.KVM_RUN_EXIT_UNION_OFFSET
        self._io = ffi.cast("kvm_exit_io_t *", exit_union)
        self._mmio = ffi.cast("kvm_exit_mmio_t *", exit_union)
        self._internal = ffi.cast("kvm_exit_internal_t *", exit_union)
        self._fail_entry = ffi.cast("kvm_exit_fail_entry_t *", exit_union)
        self._system_event = ffi.cast("kvm_exit_system_event_t *", exit_union)

        self._cond = threading.Condition()
        self._state = VcpuState.CREATED
        self._want_pause = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.exits = 0  # userspace exits handled, for stats and benchmarks
        self._kick = kick_signal()

    # ---- life cycle (called from the VM's thread) -----------------------

    @property
    def state(self) -> VcpuState:
        return self._state

    def start(self) -> None:
        with self._cond:
            if self._state is not VcpuState.CREATED:
                raise VcpuStateError(f"vcpu {self.index} already started")
            self._state = VcpuState.RUNNING
        self._thread = threading.Thread(target=self._thread_main, name=f"vcpu{self.index}", daemon=True)
        self._thread.start()

    def request_pause(self) -> None:
        """Ask the vCPU to park; returns at once (see wait_paused)."""
        with self._cond:
            self._want_pause = True
            if self._state in (VcpuState.RUNNING, VcpuState.CREATED):
                # CREATED too: a vCPU started with a pause pending must not
                # run a single guest instruction before it parks.
                self.run.immediate_exit = 1
            if self._state is VcpuState.RUNNING:
                self._send_kick()

    def wait_paused(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """Wait until the vCPU is parked (or stopped).  Re-kicks while waiting,
        so a kick that raced with an exit in progress cannot leave us hanging."""
        with self._cond:
            waited = 0.0
            while self._state is VcpuState.RUNNING:
                if waited >= timeout:
                    raise VcpuStateError(f"vcpu {self.index} did not pause within {timeout:.1f} s")
                if self._cond.wait(REKICK_INTERVAL_S):
                    continue
                waited += REKICK_INTERVAL_S
                if self._state is VcpuState.RUNNING:
                    self._send_kick()

    def pause(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        self.request_pause()
        self.wait_paused(timeout)

    def resume(self) -> None:
        with self._cond:
            self._want_pause = False
            self._cond.notify_all()

    def request_stop(self) -> None:
        """Ask the vCPU thread to end; returns at once.  Safe from any thread,
        including the vCPU's own (a device ending the VM)."""
        with self._cond:
            self._stopping = True
            if self._state is VcpuState.CREATED:
                self._state = VcpuState.STOPPED
            elif self._state is VcpuState.RUNNING:
                self.run.immediate_exit = 1
                if self._thread is not threading.current_thread():
                    self._send_kick()
            self._cond.notify_all()

    def stop(self, timeout: float = PAUSE_TIMEOUT_S) -> None:
        """End the vCPU thread (from any state) and wait for it."""
        self.request_stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise VcpuStateError(f"vcpu {self.index} did not stop within {timeout:.1f} s")

    def _send_kick(self) -> None:
        # Lock held; the thread exists while state is RUNNING.
        if self._thread is not None and self._thread.ident is not None and self._thread.is_alive():
            signal.pthread_kill(self._thread.ident, self._kick)

    # ---- the vCPU thread -------------------------------------------------

    def _thread_main(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, _MAIN_THREAD_SIGNALS)
        try:
            self._run_loop()
        except Exception as exc:  # noqa: BLE001 - reported to the VM, which stops
            log.debug("vcpu %d failed", self.index, exc_info=True)
            self.host.vcpu_failed(self.index, f"{exc}")
        finally:
            with self._cond:
                self._state = VcpuState.STOPPED
                self._cond.notify_all()

    def _run_loop(self) -> None:
        fd = self.fd
        run = self.run
        io_exit = lib.KVM_EXIT_IO
        mmio_exit = lib.KVM_EXIT_MMIO
        eintr = -errno.EINTR
        eagain = -errno.EAGAIN
        while True:
            r = run_vcpu(fd)
            if r < 0:
                if r == eintr:
                    if not self._interrupted():
                        return
                    continue
                if r == eagain:  # an AP woken by SIPI under some KVMs (PVM): run again
                    continue
                raise KvmError(lib.KVM_RUN, -r, f"vcpu {self.index}")
            self.exits += 1
            reason = run.exit_reason
            if reason == io_exit:
                self._handle_io()
            elif reason == mmio_exit:
                self._handle_mmio()
            elif not self._handle_other_exit(reason):
                return

    def _interrupted(self) -> bool:
        """KVM_RUN returned EINTR: park if asked.  False means: leave the loop."""
        with self._cond:
            if self._want_pause and not self._stopping:
                self._state = VcpuState.PAUSED
                self._cond.notify_all()
                while self._want_pause and not self._stopping:
                    self._cond.wait()
            if self._stopping:
                return False
            self._state = VcpuState.RUNNING
            self.run.immediate_exit = 0
            return True

    def _handle_io(self) -> None:
        io = self._io
        port = io.port
        size = io.size
        offset = io.data_offset
        bus = self.host.pio_bus
        buf = self._run_buf
        if io.direction == lib.KVM_EXIT_IO_OUT:
            for i in range(io.count):
                at = offset + i * size
                bus.write(port, size, int.from_bytes(buf[at : at + size], "little"))
        else:
            for i in range(io.count):
                at = offset + i * size
                buf[at : at + size] = bus.read(port, size).to_bytes(size, "little")

    def _handle_mmio(self) -> None:
        m = self._mmio
        size = m.len
        bus = self.host.mmio_bus
        if m.is_write:
            bus.write(m.phys_addr, size, int.from_bytes(ffi.buffer(m.data, size), "little"))
        else:
            ffi.memmove(m.data, bus.read(m.phys_addr, size).to_bytes(size, "little"), size)

    def _handle_other_exit(self, reason: int) -> bool:
        """Exits other than I/O.  Returns False when the vCPU must stop."""
        if reason == lib.KVM_EXIT_SHUTDOWN:
            # A triple fault: a guest that crashed so badly it could not even
            # report it.  (An orderly reset comes through the i8042 or a system
            # event instead.)  A failure, never a clean exit.
            self.host.vcpu_failed(self.index, f"vcpu {self.index}: the guest triple-faulted (KVM_EXIT_SHUTDOWN)\n"
                                              f"{self.register_dump()}")  # fmt: skip
            return False
        if reason == lib.KVM_EXIT_HLT:
            self.host.request_exit(0, "guest halted (KVM_EXIT_HLT)")
            return False
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev = self._system_event.type
            if ev in (lib.KVM_SYSTEM_EVENT_SHUTDOWN, lib.KVM_SYSTEM_EVENT_RESET):
                kind = "shutdown" if ev == lib.KVM_SYSTEM_EVENT_SHUTDOWN else "reset"
                self.host.request_exit(0, f"guest requested {kind}")
                return False
            self.host.vcpu_failed(self.index, f"guest system event {ev} (crash)\n{self.register_dump()}")
            return False
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            detail = f"hardware entry failure reason {self._fail_entry.hardware_entry_failure_reason:#x}"
        elif reason == lib.KVM_EXIT_INTERNAL_ERROR:
            ie = self._internal
            data = " ".join(f"{ie.data[i]:#x}" for i in range(min(ie.ndata, 16)))
            detail = f"suberror {ie.suberror} data [{data}]"
        else:
            detail = "unexpected exit"
        name = EXIT_REASON_NAMES.get(reason, f"exit reason {reason}")
        self.host.vcpu_failed(self.index, f"vcpu {self.index}: {name}: {detail}\n{self.register_dump()}")
        return False

    # ---- state access ----------------------------------------------------

    def _require_quiescent(self) -> None:
        on_own_thread = self._thread is not None and threading.current_thread() is self._thread
        if not on_own_thread and self._state not in (VcpuState.CREATED, VcpuState.PAUSED, VcpuState.STOPPED):
            raise VcpuStateError(f"vcpu {self.index} must be paused to access its state (it is {self._state.value})")

    def get(self, request: int, ctype: str):
        """Read one piece of vCPU state (KVM_GET_*) into a new struct."""
        self._require_quiescent()
        buf = ffi.new(ctype + " *")
        ioctl(self.fd, request, buf, what=f"vcpu {self.index}")
        return buf

    def set(self, request: int, buf) -> None:
        """Write one piece of vCPU state (KVM_SET_*)."""
        self._require_quiescent()
        ioctl(self.fd, request, buf, what=f"vcpu {self.index}")

    def get_regs(self):
        return self.get(lib.KVM_GET_REGS, "struct kvm_regs")

    def set_regs(self, regs) -> None:
        self.set(lib.KVM_SET_REGS, regs)

    def get_sregs(self):
        return self.get(lib.KVM_GET_SREGS, "struct kvm_sregs")

    def set_sregs(self, sregs) -> None:
        self.set(lib.KVM_SET_SREGS, sregs)

    def set_cpuid(self, entries: list) -> None:
        self._require_quiescent()
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, e in enumerate(entries):
            buf.entries[i] = e[0]
        ioctl(self.fd, lib.KVM_SET_CPUID2, buf, what=f"vcpu {self.index}")

    def set_mp_state(self, mp_state: int) -> None:
        buf = ffi.new("struct kvm_mp_state *", {"mp_state": mp_state})
        self.set(lib.KVM_SET_MP_STATE, buf)

    def tsc_khz(self) -> int:
        return ioctl(self.fd, lib.KVM_GET_TSC_KHZ, what=f"vcpu {self.index}")

    # ---- the whole vCPU state, for snapshots and checkpoints -------------

    # (name, GET ioctl, SET ioctl, struct) in the order KVM wants them restored:
    # MP state first, then registers, FPU/XSAVE, debug registers, the LAPIC,
    # MSRs (separately, below) and finally the pending events.
    _STATE_PIECES = (
        ("mp_state", "KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "struct kvm_mp_state"),
        ("regs", "KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs"),
        ("sregs", "KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs"),
        ("fpu", "KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu"),
        ("xcrs", "KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs"),
        ("debugregs", "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs"),
        ("lapic", "KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state"),
    )
    _EVENTS = ("events", "KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def save_state(self, msr_indices: list[int], xsave_size: int) -> dict[str, bytes]:
        """Every piece of vCPU state as raw kernel-ABI bytes (the vCPU must be
        paused or not yet started)."""
        self._require_quiescent()
        state = {}
        for name, get, _, ctype in self._STATE_PIECES + (self._EVENTS,):
            buf = ffi.new(ctype + " *")
            ioctl(self.fd, getattr(lib, get), buf, what=f"vcpu {self.index}")
            state[name] = bytes(ffi.buffer(buf))
        xsave = ffi.new("char[]", xsave_size)
        get_xsave = lib.KVM_GET_XSAVE2 if xsave_size > ffi.sizeof("struct kvm_xsave") else lib.KVM_GET_XSAVE
        ioctl(self.fd, get_xsave, xsave, what=f"vcpu {self.index}")
        state["xsave"] = bytes(ffi.buffer(xsave))
        state["msrs"] = self._get_msrs(msr_indices)
        return state

    def load_state(self, state: dict[str, bytes]) -> None:
        """Apply a save_state() result, in the order PVM-NOTES measured to work:
        MP state, regs, sregs, FPU, XSAVE, XCRs, debug regs, LAPIC, MSRs, events."""
        self._require_quiescent()
        pieces = {name: (set_, ctype + " *") for name, _, set_, ctype in self._STATE_PIECES}
        for name in ("mp_state", "regs", "sregs", "fpu"):
            self._set_blob(*pieces[name], state[name])
        self._set_blob("KVM_SET_XSAVE", "char[]", state["xsave"])
        for name in ("xcrs", "debugregs", "lapic"):
            self._set_blob(*pieces[name], state[name])
        self._set_msrs(state["msrs"])
        self._set_blob(self._EVENTS[2], self._EVENTS[3] + " *", state["events"])

    def _set_blob(self, set_name: str, ctype: str, blob: bytes) -> None:
        if ctype.endswith("[]"):
            buf = ffi.new(ctype, len(blob))
        else:
            buf = ffi.new(ctype)
            if ffi.sizeof(buf[0]) != len(blob):
                raise ValueError(f"vcpu state {set_name}: {len(blob)} bytes, expected {ffi.sizeof(buf[0])}")
        ffi.memmove(buf, blob, len(blob))
        ioctl(self.fd, getattr(lib, set_name), buf, what=f"vcpu {self.index}")

    def _get_msrs(self, indices: list[int]) -> bytes:
        """MSRs as packed (u32 index, u32 pad, u64 value) entries."""
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, lib.KVM_GET_MSRS, buf, what=f"vcpu {self.index}")
        if n != len(indices):
            raise KvmError(lib.KVM_GET_MSRS, errno.EIO, f"vcpu {self.index}: MSR {indices[n]:#x} unreadable")
        return bytes(ffi.buffer(buf.entries, ffi.sizeof("struct kvm_msr_entry") * len(indices)))

    def _set_msrs(self, packed: bytes) -> None:
        n = len(packed) // ffi.sizeof("struct kvm_msr_entry")
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        ffi.memmove(buf.entries, packed, len(packed))
        done = ioctl(self.fd, lib.KVM_SET_MSRS, buf, what=f"vcpu {self.index}")
        if done != n:
            raise KvmError(lib.KVM_SET_MSRS, errno.EIO, f"vcpu {self.index}: MSR {buf.entries[done].index:#x} refused")

    def readable_msrs(self, candidates: list[int]) -> list[int]:
        """The candidates this vCPU can read back (KVM stops at the first failure)."""
        self._require_quiescent()
        keep = list(candidates)
        while keep:
            buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(keep), "entries": len(keep)})
            for i, index in enumerate(keep):
                buf.entries[i].index = index
            n = ioctl(self.fd, lib.KVM_GET_MSRS, buf, what=f"vcpu {self.index}")
            if n == len(keep):
                return keep
            del keep[n]
        return keep

    def register_dump(self) -> str:
        """General and system registers as text, for error reports."""
        try:
            r = self.get_regs()
            s = self.get_sregs()
        except (KvmError, VcpuStateError) as exc:
            return f"  (registers unavailable: {exc})"
        g = [
            ("rax", r.rax), ("rbx", r.rbx), ("rcx", r.rcx), ("rdx", r.rdx),
            ("rsi", r.rsi), ("rdi", r.rdi), ("rsp", r.rsp), ("rbp", r.rbp),
            ("r8", r.r8), ("r9", r.r9), ("r10", r.r10), ("r11", r.r11),
            ("r12", r.r12), ("r13", r.r13), ("r14", r.r14), ("r15", r.r15),
            ("rip", r.rip), ("rflags", r.rflags),
            ("cr0", s.cr0), ("cr2", s.cr2), ("cr3", s.cr3), ("cr4", s.cr4), ("efer", s.efer),
        ]  # fmt: skip
        lines = []
        for i in range(0, len(g), 4):
            lines.append("  " + "  ".join(f"{n:>6}={v:016x}" for n, v in g[i : i + 4]))
        lines.append(f"      cs={s.cs.selector:04x} (dpl {s.cs.dpl}, l {s.cs.l})  ss={s.ss.selector:04x}  tr={s.tr.selector:04x}")
        return "\n".join(lines)

    def close(self) -> None:
        self._run_buf.release()
        ffi.release(self._run_base)
        self._run_map.close()
        os.close(self.fd)
