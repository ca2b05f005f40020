"""Layer 5: a switchover — the pair's roles swapped as planned, nothing
copied, never unprotected for longer than the swap itself.

`kvmcolo switchover` on the primary (host A), with B its secondary:

    A  holds its guest; the last checkpoint this way round (colo.py:
       SWITCHOVER, then the usual transaction; B holds its SVM from
       SWITCHOVER on).  Once it is loaded both guests are the same, stopped.
    B  its overlays (emptied by that load) pass writes through, its taps
       join their bridges and announce the guest; it handshakes as the new
       primary on the same connection
    A  its taps leave their bridges, its disks go behind overlays (mounted
       before the hold, while the guest still ran), its own RAM becomes the
       new secondary's RAM cache; it answers that handshake as the secondary
    B  sends the initial state: vCPU, VM and device state and the pages
       touched since the last checkpoint (none, normally) — no pre-copy, no
       disk sync (equal by construction: hashing them would stop both
       guests for as long as reading the disks takes)
    both  release their holds: checkpoints go from B to A.

Losing the peer half way is a failover like any other: before the last
checkpoint is loaded, A runs on alone and B takes over (with fencing, if
set); after it, B abandons the new pair and runs alone, and A, which holds
the same state, fails over as a secondary that lost its primary.
"""

from __future__ import annotations

import logging
import time

from kvmcolo import colo_link, vmstate
from kvmcolo.errors import UserError
from kvmcolo.wire import ChannelError

log = logging.getLogger("kvmcolo.colo")

LAST_CHECKPOINT_TIMEOUT_S = 30.0  # the last checkpoint (normally milliseconds) or the pair is given up
_LINK_FAILURES = (UserError, ChannelError, OSError, vmstate.IncompatibleState)


def old_primary(machine, primary, disks, adopt) -> None:
    """Host A's half (its own thread): `primary` the running ColoPrimary,
    `disks` the VMM's DiskViews, `adopt(colo)` makes the VMM's driver the
    new ColoSecondary."""
    from kvmcolo.colo_secondary import ColoSecondary

    try:
        disks.prepare_buffering()  # while the guest runs: the mounts take a while
    except UserError as e:
        _refused(primary, f"switchover refused: {e}")
        return
    cache, changed = _cache_of_own_ram(machine)
    held_at = time.perf_counter()
    machine.hold("switchover")

    def undo() -> None:  # the roles stay as they were
        machine.release("switchover")
        disks.unprepare()
        cache.close()

    try:
        switched = primary.switch_over(LAST_CHECKPOINT_TIMEOUT_S)
    except BaseException:
        undo()
        raise
    if not switched:
        undo()
        _refused(primary, "switchover failed: the secondary was lost before the last checkpoint; the guest runs "
                 "on here alone")  # fmt: skip
        return
    t_last = time.perf_counter()
    sock = primary.hand_over_link()
    refreshed = cache.refresh(changed.collect())  # the last checkpoint's RAM, exactly
    t_link = time.perf_counter()
    disks.buffer(machine)
    secondary = ColoSecondary(machine, None, primary.key, primary.options, disks.bases, disks.overlays,
                              switchover=True, status=primary.status, cache=cache)  # fmt: skip
    adopt(secondary)
    t_ready = time.perf_counter()
    try:
        secondary.wait_for_primary(sock)
    except _LINK_FAILURES as e:
        secondary.fail_over(f"the new primary was lost during the switchover: {e}")
        machine.release("switchover")
        return
    secondary.start()
    machine.release("switchover")
    t_end = time.perf_counter()
    log.info("switchover: this side is the secondary now; the guest was held here %.1f ms (last checkpoint %.1f, "
             "taps, disk forwarding and %d RAM pages %.1f, overlays %.1f, the new pair %.1f)",
             (t_end - held_at) * 1e3, (t_last - held_at) * 1e3, refreshed, (t_link - t_last) * 1e3,
             (t_ready - t_link) * 1e3, (t_end - t_ready) * 1e3)  # fmt: skip


def old_secondary(machine, secondary, adopt) -> None:
    """Host B's half (its own thread, once the last checkpoint is loaded and
    the SVM held): `adopt(colo)` makes the VMM's driver the new ColoPrimary."""
    from kvmcolo.colo_primary import ColoPrimary

    old_peer = secondary.status.peer
    t0 = time.perf_counter()
    sock = secondary.hand_over_link()
    t_link = time.perf_counter()
    primary = ColoPrimary(machine, colo_link.peer_address(sock), secondary.key, secondary.options, secondary.status,
                          colo_link.MODE_SWITCHOVER)  # fmt: skip
    adopt(primary)
    try:
        primary.take_over_pair(sock)
    except _LINK_FAILURES as e:
        primary.abandon(f"switchover: the new secondary was lost before the new pair ran: {e}")
        secondary.release_switch_hold()
        secondary.release_cache()
        return
    t_pair = time.perf_counter()
    pause_ms = secondary.release_switch_hold()
    secondary.release_cache()
    log.info("switchover: disks and taps taken over in %.1f ms, the new pair in %.1f ms", (t_link - t0) * 1e3,
             (t_pair - t_link) * 1e3)  # fmt: skip
    primary.status.switched_over(old_peer, pause_ms or 0.0)
    primary.send_history()


def _cache_of_own_ram(machine):
    """The new secondary's RAM cache, filled from this host's guest while it
    still runs; returns it with the dirty-log reader (armed first) that
    says which pages to copy again once the guest is held."""
    from kvmcolo import dirty_log
    from kvmcolo.ram_cache import RamCache

    with machine.held("precopy"):  # (a reader is armed with the vCPUs parked)
        changed = dirty_log.of(machine).reader("switchover")
        changed.collect()
    cache = RamCache(machine.config.mem_size)
    cache.copy_from(machine.vm.memory)
    return cache, changed


def _refused(primary, why: str) -> None:
    log.error("%s", why)
    if primary.status.state == "switching":
        primary.status.set(state="colo")
    primary.status.set(last_error=why)
