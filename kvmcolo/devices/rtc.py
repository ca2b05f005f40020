"""MC146818 CMOS real-time clock and NVRAM (ports 0x70/0x71).

What a Linux boot uses it for: reading the wall clock (the persistent clock
without kvmclock, and rtc_cmos's hctosys), the century register the FADT
names, and the shutdown-status byte and NVRAM the SMP bring-up writes (the
warm-reset code in register 0x0F).  Port 0x70 selects a register (its top
bit masks NMI, which we record and ignore); port 0x71 reads or writes it.

Time is kept as an offset from the host's wall clock, so it runs while the
guest is paused or saved, as a real RTC runs on its battery, and a COLO
secondary that adopts the primary's offset reads the same time from its own
(NTP-synchronised) clock.  Writing the time (register B's SET bit, then
clearing it) moves the offset.  BCD or binary and 12- or 24-hour formats are
register B's, as the guest chose.

Explicitly absent: the periodic, alarm and update-ended interrupts (IRQ 8).
Register C's flags stay clear and the IRQ line is never raised; a guest that
needs a periodic tick has the LAPIC timer (and kvmclock).
"""

from __future__ import annotations

import calendar
import threading
import time
from typing import Callable

RTC_PORT = 0x70  # index; 0x71 is data
RTC_IRQ = 8

SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR = 0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
NVRAM_SIZE = 128

A_UIP = 0x80  # update in progress
B_SET, B_BINARY, B_24H = 0x80, 0x04, 0x02
D_VRT = 0x80  # valid RAM and time: the battery is good
_UIP_WINDOW_S = 244e-6  # the update cycle takes 244 us before each second's end
_TIME_REGS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)


class CmosRtc:
    def __init__(self, now: Callable[[], float] = time.time):
        self._now = now  # the host's wall clock (tests give their own)
        self._lock = threading.Lock()
        self._index = 0
        self._nmi_masked = False
        self._offset = 0.0  # guest wall time minus host wall time, seconds
        self._cmos = bytearray(NVRAM_SIZE)
        self._cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz rate (the power-on value)
        self._cmos[REG_B] = B_24H  # 24-hour, BCD, no interrupts
        self._cmos[REG_D] = D_VRT

    # ---- bus side ----

    def io_read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                return 0xFF  # the index register is write-only
            return self._read(self._index)

    def io_write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self._index, self._nmi_masked = value & 0x7F, bool(value & 0x80)
            else:
                self._write(self._index, value)

    # ---- registers (lock held) ----

    def _read(self, reg: int) -> int:
        if reg in _TIME_REGS and not self._cmos[REG_B] & B_SET:
            self._latch_time()
        elif reg == REG_A:
            guest = self._now() + self._offset
            uip = A_UIP if guest - int(guest) >= 1 - _UIP_WINDOW_S and not self._cmos[REG_B] & B_SET else 0
            return (self._cmos[REG_A] & 0x7F) | uip
        elif reg == REG_C:
            return 0  # no interrupt has happened (they are absent: see the module's doc)
        return self._cmos[reg]

    def _write(self, reg: int, value: int) -> None:
        if reg in (REG_C, REG_D):
            return  # read-only
        if reg == REG_A:
            value &= 0x7F  # UIP is read-only
        if reg == REG_B:
            was_set = self._cmos[REG_B] & B_SET
            if value & B_SET and not was_set:
                self._latch_time()  # the registers hold the time the guest now edits
            self._cmos[REG_B] = value
            if was_set and not value & B_SET:
                self._offset = self._registers_time() - self._now()
            return
        self._cmos[reg] = value

    def _latch_time(self) -> None:
        """Put the guest's current time in the time registers, in register B's format."""
        t = time.gmtime(int(self._now() + self._offset))
        enc = (lambda v: v) if self._cmos[REG_B] & B_BINARY else _to_bcd
        for reg, v in ((SECONDS, t.tm_sec), (MINUTES, t.tm_min), (WEEKDAY, (t.tm_wday + 1) % 7 + 1),
                       (DAY, t.tm_mday), (MONTH, t.tm_mon), (YEAR, t.tm_year % 100), (CENTURY, t.tm_year // 100)):  # fmt: skip
            self._cmos[reg] = enc(v)
        hour, pm = t.tm_hour, 0
        if not self._cmos[REG_B] & B_24H:  # 1-12, with the top bit for PM
            hour, pm = hour % 12 or 12, 0x80 if hour >= 12 else 0
        self._cmos[HOURS] = enc(hour) | pm

    def _registers_time(self) -> float:
        """The time the guest wrote in the time registers, as seconds since the epoch."""
        binary = bool(self._cmos[REG_B] & B_BINARY)
        dec = (lambda v: v) if binary else _from_bcd
        raw_hour = self._cmos[HOURS]
        hour = dec(raw_hour & 0x7F)
        if not self._cmos[REG_B] & B_24H:
            hour = hour % 12 + (12 if raw_hour & 0x80 else 0)
        year = dec(self._cmos[CENTURY]) * 100 + dec(self._cmos[YEAR])
        fields = (year, dec(self._cmos[MONTH]), dec(self._cmos[DAY]), hour, dec(self._cmos[MINUTES]), dec(self._cmos[SECONDS]))
        try:
            return float(calendar.timegm((*fields, 0, 0, 0)))
        except (ValueError, OverflowError):
            return self._now() + self._offset  # nonsense written: the clock keeps its time

    # ---- checkpoints ----

    def save_state(self) -> dict:
        with self._lock:
            return {"index": self._index, "nmi_masked": self._nmi_masked, "offset": self._offset,
                    "cmos": bytes(self._cmos).hex()}  # fmt: skip

    def load_state(self, state: dict) -> None:
        cmos = bytes.fromhex(state["cmos"])
        if len(cmos) != NVRAM_SIZE:
            raise ValueError(f"saved CMOS has {len(cmos)} bytes, not {NVRAM_SIZE}")
        with self._lock:
            self._index = int(state["index"]) & 0x7F
            self._nmi_masked = bool(state["nmi_masked"])
            self._offset = float(state["offset"])
            self._cmos = bytearray(cmos)


def _to_bcd(v: int) -> int:
    return (v // 10) << 4 | v % 10


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)
