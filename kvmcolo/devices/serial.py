"""8250/16550A UART (COM1 at 0x3f8, IRQ 4).

Output goes to a binary stream (the VMM's stdout or a log file), flushed at
every newline so a reader sees whole lines promptly.  Input is pushed in by
the VMM (feed()) from stdin when it is interactive, or from the control
socket; a BREAK (send_break()) arrives as a NUL with the line status's BI
bit, as on a real line, which is how a Linux console takes a magic SysRq.
The transmitter is infinitely fast: the line status always says
"transmitter empty".
"""

from __future__ import annotations

import collections
import threading
from typing import BinaryIO, Callable

COM1_PORT = 0x3F8
COM1_IRQ = 4

# register offsets
RBR_THR = 0  # receive buffer / transmit holding (DLL when DLAB)
IER = 1  # interrupt enable (DLM when DLAB)
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01  # received data available
IER_THRE = 0x02  # transmitter holding register empty
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO = 0xC0
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_BI = 0x10  # break interrupt: the character at the head of the FIFO is a BREAK
LSR_THRE = 0x20
LSR_TEMT = 0x40
MSR_DCD_DSR_CTS = 0xB0
RX_FIFO_LIMIT = 4096
BREAK = 0x100  # in the receive queue: a BREAK condition (reads as NUL, with LSR_BI)


class Serial8250:
    def __init__(self, output: BinaryIO | None, set_irq: Callable[[bool], None]):
        self._output = output
        self._set_irq = set_irq
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self._ier = 0
        self._lcr = 0x03  # 8N1
        self._mcr = 0x08  # OUT2
        self._scr = 0
        self._dll = 0x01  # 115200 baud
        self._dlm = 0
        self._fifo_enabled = False
        self._thre_pending = False
        self._irq_level = False

    # ---- host side ----

    def feed(self, data: bytes) -> None:
        """Queue bytes for the guest to read (excess beyond the FIFO limit is dropped)."""
        with self._lock:
            room = RX_FIFO_LIMIT - len(self._rx)
            self._rx.extend(data[:room])
            self._update_irq()

    def send_break(self) -> None:
        """Hold the line in BREAK for a character time."""
        with self._lock:
            if len(self._rx) < RX_FIFO_LIMIT:
                self._rx.append(BREAK)
            self._update_irq()

    # ---- bus side ----

    def io_read(self, offset: int, size: int) -> int:
        with self._lock:
            dlab = self._lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    return self._dll
                value = self._rx.popleft() if self._rx else 0
                self._update_irq()
                return value & 0xFF
            if offset == IER:
                return self._dlm if dlab else self._ier
            if offset == IIR_FCR:
                iir = self._pending_source()
                if iir == IIR_THRE:
                    self._thre_pending = False  # reading IIR acknowledges THRE
                    self._update_irq()
                return iir | (IIR_FIFO if self._fifo_enabled else 0)
            if offset == LCR:
                return self._lcr
            if offset == MCR:
                return self._mcr
            if offset == LSR:
                return LSR_THRE | LSR_TEMT | (LSR_DR if self._rx else 0) | (LSR_BI if self._rx and self._rx[0] == BREAK else 0)
            if offset == MSR:
                return MSR_DCD_DSR_CTS
            return self._scr

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            dlab = self._lcr & LCR_DLAB
            if offset == RBR_THR:
                if dlab:
                    self._dll = value
                    return
                self._transmit(value)
                self._thre_pending = True
            elif offset == IER:
                if dlab:
                    self._dlm = value
                    return
                if value & IER_THRE and not self._ier & IER_THRE:
                    self._thre_pending = True  # enabling THRE with an empty holding register
                self._ier = value & 0x0F
            elif offset == IIR_FCR:
                self._fifo_enabled = bool(value & 0x01)
                if value & 0x02:
                    self._rx.clear()
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value & 0x1F
            elif offset == SCR:
                self._scr = value
            self._update_irq()

    # ---- internals (lock held) ----

    def _transmit(self, byte: int) -> None:
        if self._output is None:
            return
        self._output.write(bytes((byte,)))
        if byte == 0x0A:
            self._output.flush()

    def _pending_source(self) -> int:
        if self._ier & IER_RDA and self._rx:
            return IIR_RDA
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_irq(self) -> None:
        level = self._pending_source() != IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            self._set_irq(level)

    # ---- checkpoints ----

    _REGISTERS = ("_ier", "_lcr", "_mcr", "_scr", "_dll", "_dlm", "_fifo_enabled", "_thre_pending", "_irq_level")

    def save_state(self) -> dict:
        with self._lock:
            state = {name.lstrip("_"): getattr(self, name) for name in self._REGISTERS}
            state["rx"] = bytes(b & 0xFF for b in self._rx).hex()
            state["rx_breaks"] = [i for i, b in enumerate(self._rx) if b == BREAK]
            return state

    def load_state(self, state: dict) -> None:
        with self._lock:
            for name in self._REGISTERS:
                setattr(self, name, type(getattr(self, name))(state[name.lstrip("_")]))
            rx = list(bytes.fromhex(state["rx"]))
            for i in state.get("rx_breaks", []):  # saved before BREAK existed: none
                if not 0 <= i < len(rx):
                    raise ValueError(f"saved serial state has a BREAK at {i}, outside its {len(rx)}-byte queue")
                rx[i] = BREAK
            self._rx = collections.deque(rx)
            self._set_irq(self._irq_level)

    def flush(self) -> None:
        with self._lock:
            if self._output is not None:
                self._output.flush()
