"""Layer 4: the live pre-copy's driver — sends the guest's RAM while it runs,
as precopy.py's core decides, until what is left fits the downtime limit.

    live = LiveCopy(machine, channel, reader, Limits(...), max_bandwidth, report)
    live.run()            # rounds while the guest runs; returns at stop-and-copy
    ... hold the guest, capture with the same reader, send the final state ...
    live.finished(downtime_s)

Each round: the pages of the last collect go out in PRECOPY_PAGES frames
while the guest runs (a page written while it is copied is in the dirty log
again, so a torn copy is always sent again later); then the guest is held
just long enough to collect what it dirtied meanwhile (the dirty-log owner
wants the vCPUs and the I/O thread parked for a harvest, and a VMM write
marked before its data lands must not be harvested half done).  The count
is what the core decides on; at stop-and-copy the collected pages are put
back, so the final capture (same reader) sends them with the vCPU state.

The throttle (auto-converge) is applied as the core asks, and always ends
before this returns: the guest runs at full speed after the switch.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from kvmcolo import vmstate
from kvmcolo.colo import Msg
from kvmcolo.dirty_log import DirtyReader, RegionDirty
from kvmcolo.kvm_ffi import ffi
from kvmcolo.precopy import SEND, STOP_AND_COPY, Limits, PrecopyCore
from kvmcolo.throttle import Throttle

log = logging.getLogger("kvmcolo.colo")

FRAME_PAGES = 1024  # 4 MiB per PRECOPY_PAGES frame: progress, pacing and a bounded buffer


class LiveCopy:
    def __init__(self, machine, channel, reader: DirtyReader, limits: Limits, max_bandwidth: float | None,
                 report: Callable[[dict], None]):  # fmt: skip
        """`max_bandwidth`: bytes per second the pre-copy may use (None: the
        link's speed); `report(status)`: each round's progress (for the status)."""
        self.machine = machine
        self.channel = channel
        self.reader = reader
        self.max_bandwidth = max_bandwidth
        self._report = report
        self.core = PrecopyCore(sum(r.npages for r in machine.vm.memory.regions), limits)
        self.throttle = Throttle(machine.run_state)
        self._buffer = bytearray()
        self._paced_since = 0.0
        self._paced_bytes = 0

    def run(self) -> None:
        """Send rounds until the rest fits the downtime limit (or a limit
        says stop); the guest keeps running throughout, save the short holds."""
        self._report(self.core.status())
        try:
            with self.machine.held("precopy"):
                work = vmstate.nonzero_pages(self.reader.collect())  # a fresh peer's RAM is zero
            self._paced_since, self._paced_bytes = time.monotonic(), 0
            while self.core.next_step().action == SEND:
                t0 = time.monotonic()
                sent = self._send(work)
                seconds = time.monotonic() - t0
                with self.machine.held("precopy"):
                    work = self.reader.collect()
                state = self.core.round_done(sent, seconds, sum(d.count for d in work))
                self._log_round()
                if state == STOP_AND_COPY:
                    self.reader.put_back(work)  # they go with the final state
                else:
                    self.throttle.set(self.core.throttle_pct)
        except BaseException:
            self.core.failed()
            self._report(self.core.status())
            raise
        finally:
            self.throttle.stop()

    def finished(self, downtime_s: float) -> dict:
        self.core.finished(downtime_s)
        status = self.core.status()
        self._report(status)
        return status

    # ---- sending -----------------------------------------------------------

    def _send(self, work: list[RegionDirty]) -> int:
        """Every page of `work`, copied from the running guest, in frames of
        FRAME_PAGES; returns the bytes sent."""
        sent = 0
        for d in work:
            for start in range(0, d.count, FRAME_PAGES):
                count = min(FRAME_PAGES, d.count - start)
                part = RegionDirty(d.region, ffi.cast("uint32_t *", d.pages) + start, count)
                section = vmstate.ram_section([part], self._buffer)
                self._buffer = section.payload.obj  # grown once, reused by the next frame
                self.channel.send(Msg.PRECOPY_PAGES, [section.payload])
                sent += len(section.payload)
                self._pace(len(section.payload))
        return sent

    def _pace(self, nbytes: int) -> None:
        """Keep the pre-copy under --max-bandwidth (the link is shared with
        the disk sync and, on a real network, with everything else)."""
        if not self.max_bandwidth:
            return
        self._paced_bytes += nbytes
        due = self._paced_since + self._paced_bytes / self.max_bandwidth
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)

    def _log_round(self) -> None:
        s = self.core.status()
        self._report(s)
        log.info("pre-copy round %d: %.1f MiB sent, %.1f MiB left, %s dirty pages/s, expected downtime %s ms%s",
                 len(self.core.rounds), s["sent_mib"], s["remaining_mib"], s["dirty_pages_per_s"],
                 s["expected_downtime_ms"], f", guest throttled {s['throttle_pct']}%" if s["throttle_pct"] else "")  # fmt: skip
