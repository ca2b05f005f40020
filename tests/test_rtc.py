"""The CMOS RTC (issue 13) on a clock the test controls: what a guest reads
in each format, setting the time, the update-in-progress window, NVRAM and
the state a snapshot or checkpoint carries.  The Linux tests read it through
a real kernel's rtc_cmos driver."""

from __future__ import annotations

import calendar

import pytest

from kvmcolo.devices import rtc as R

T0 = calendar.timegm((2026, 12, 2, 15, 4, 5, 0, 0, 0))  # a Wednesday, 15:04:05 UTC


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def read(dev, reg: int) -> int:
    dev.io_write(0, 1, reg)
    return dev.io_read(1, 1)


def write(dev, reg: int, value: int) -> None:
    dev.io_write(0, 1, reg)
    dev.io_write(1, 1, value)


def fields(dev) -> tuple:
    return tuple(read(dev, r) for r in (R.CENTURY, R.YEAR, R.MONTH, R.DAY, R.WEEKDAY, R.HOURS, R.MINUTES, R.SECONDS))


def test_power_on_reads_the_host_time_in_bcd_24_hour():
    dev = R.CmosRtc(Clock(T0 + 0.5))
    assert fields(dev) == (0x20, 0x26, 0x12, 0x02, 4, 0x15, 0x04, 0x05)  # weekday: Sunday is 1
    assert read(dev, R.REG_D) & R.D_VRT and read(dev, R.REG_B) == R.B_24H


def test_binary_and_12_hour_formats():
    dev = R.CmosRtc(Clock(T0))
    write(dev, R.REG_B, R.B_BINARY)  # binary, 12-hour
    assert fields(dev) == (20, 26, 12, 2, 4, 0x80 | 3, 4, 5)  # 3 PM
    write(dev, R.REG_B, 0)  # BCD, 12-hour
    assert read(dev, R.HOURS) == 0x83


def test_setting_the_time_moves_the_clock_and_it_keeps_running():
    clock = Clock(T0)
    dev = R.CmosRtc(clock)
    write(dev, R.REG_B, R.B_24H | R.B_SET)
    for reg, v in ((R.CENTURY, 0x19), (R.YEAR, 0x99), (R.MONTH, 0x12), (R.DAY, 0x31), (R.HOURS, 0x23),
                   (R.MINUTES, 0x59), (R.SECONDS, 0x58)):  # fmt: skip
        write(dev, reg, v)
    clock.t += 30  # while SET, the clock does not tick for the guest
    assert read(dev, R.SECONDS) == 0x58
    write(dev, R.REG_B, R.B_24H)
    clock.t += 3
    assert fields(dev)[:4] == (0x20, 0x00, 0x01, 0x01) and fields(dev)[5:] == (0x00, 0x00, 0x01)


def test_nonsense_time_written_leaves_the_clock_alone():
    dev = R.CmosRtc(Clock(T0))
    write(dev, R.REG_B, R.B_24H | R.B_SET)
    write(dev, R.MONTH, 0x13)  # month 13
    write(dev, R.REG_B, R.B_24H)
    assert fields(dev) == (0x20, 0x26, 0x12, 0x02, 4, 0x15, 0x04, 0x05)


def test_update_in_progress_only_just_before_a_second_ends():
    clock = Clock(T0 + 0.5)
    dev = R.CmosRtc(clock)
    assert not read(dev, R.REG_A) & R.A_UIP
    clock.t = T0 + 0.9999
    assert read(dev, R.REG_A) & R.A_UIP
    write(dev, R.REG_A, 0xFF)  # UIP is read-only
    clock.t = T0 + 0.5
    assert read(dev, R.REG_A) == 0x7F


def test_nvram_shutdown_status_and_read_only_registers():
    dev = R.CmosRtc(Clock(T0))
    write(dev, 0x0F, 0x0A)  # the warm-reset code Linux writes before starting an AP
    write(dev, 0x7F, 0x5A)
    write(dev, R.REG_C, 0xFF)
    write(dev, R.REG_D, 0x00)
    assert (read(dev, 0x0F), read(dev, 0x7F), read(dev, R.REG_C), read(dev, R.REG_D)) == (0x0A, 0x5A, 0, R.D_VRT)
    dev.io_write(0, 1, 0x80 | 0x0F)  # NMI masked, same register
    assert dev.io_read(1, 1) == 0x0A and dev.io_read(0, 1) == 0xFF


def test_state_carries_time_nvram_and_index_to_another_host():
    clock = Clock(T0)
    a = R.CmosRtc(clock)
    write(a, R.REG_B, R.B_24H | R.B_SET)
    write(a, R.HOURS, 0x01)
    write(a, R.REG_B, R.B_24H)
    write(a, R.REG_B, R.B_24H | R.B_BINARY)
    write(a, 0x40, 0x77)
    a.io_write(0, 1, R.MINUTES)
    b = R.CmosRtc(Clock(T0 + 60))  # the other host, a minute later on its clock
    b.load_state(a.save_state())
    assert b.io_read(1, 1) == 5  # index kept: minutes, now 01:05:05 in binary
    assert read(b, R.HOURS) == 1 and read(b, 0x40) == 0x77
    with pytest.raises(ValueError):
        b.load_state({**a.save_state(), "cmos": "00"})
