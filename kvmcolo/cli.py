"""Layer 5: the `kvmcolo` command line.

Mistakes a user can make end with one line on stderr and exit status 2, never
a traceback.  `kvmcolo run` exits with the guest's debug-exit status, 0 when
the guest shuts down or resets, and 1 when a vCPU fails (the log says why).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import time
import sys

from kvmcolo import __version__
from kvmcolo.argtypes import address, number
from kvmcolo.cpu_model import CpuModel
from kvmcolo.errors import UserError

log = logging.getLogger("kvmcolo")

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'256M', '1G', '512MiB', '65536K'; a bare number is MiB (as QEMU's -m)."""
    m = _SIZE_RE.match(text)
    if not m:
        raise UserError(f"bad size {text!r}: use a number with an optional K, M, G or T suffix (e.g. 256M)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's API
        raise UserError(f"{self.prog}: {message} (see --help)")


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="kvmcolo",
        description="kvmcolo: a userspace KVM checkpointer that keeps a guest's service alive "
        "when its host dies (COLO).",
        epilog="Run 'kvmcolo COMMAND --help' for a command's options.",
    )
    p.add_argument("--version", action="version", version=f"kvmcolo {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    p.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="boot a guest and run it until it exits",
        description="Boot a PVH kernel (or a built-in tiny guest) and run it until it exits. "
        "The guest's serial console is printed on stdout; kvmcolo exits with the status "
        "the guest writes to the debug-exit port (0xf4).",
        epilog="Examples:\n"
        "  kvmcolo run --image hello\n"
        "  kvmcolo run --image dirty -- pages=256 passes=1000\n"
        "  kvmcolo run --image smp --cpus 2\n"
        "  kvmcolo run --image disk --disk /tmp/disk.img -- records=100\n"
        "  kvmcolo run --image netsrv --net tap=tap0 -- ip=192.168.77.2\n"
        "  kvmcolo run --kernel ./vmlinux --cmdline 'console=ttyS0' --mem 512M",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_vm_options(run, kernel_required=True)
    _add_control_option(run, serve=True)

    boot = sub.add_parser(
        "boot",
        help="run a guest under COLO, as the primary or the secondary",
        description="Run one guest on two hosts in lock-step (COLO). Start the secondary first "
        "(it waits for the primary), then the primary with the same VM options; the primary "
        "boots the guest, copies it to the secondary and checkpoints it from then on. If either "
        "host dies, the other goes on alone.",
        epilog="Example (the same key file on both hosts):\n"
        "  hostB# kvmcolo boot --secondary --listen 0.0.0.0:7777 --key-file /etc/kvmcolo.key --image dirty\n"
        "  hostA# kvmcolo boot --primary --peer hostB:7777 --key-file /etc/kvmcolo.key --image dirty",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    role = boot.add_mutually_exclusive_group(required=True)
    role.add_argument("--primary", action="store_true", help="boot the guest and checkpoint it to --peer")
    role.add_argument("--secondary", action="store_true", help="wait on --listen for the primary and follow it")
    role.add_argument("--incoming", action="store_true",
                      help="wait on --listen for a live migration ('kvmcolo migrate' on the source), then run "
                      "the guest here")  # fmt: skip
    boot.add_argument("--peer", metavar="HOST:PORT", help="the secondary's replication address (primary)")
    boot.add_argument("--listen", metavar="HOST:PORT", help="address to wait for the primary on (secondary)")
    _add_colo_options(boot)
    boot.add_argument("--standby", action="append", default=[], metavar="HOST:PORT",
                      help="heal by itself: when this side runs alone (its peer lost), protect the guest again "
                      "with the secondary waiting at HOST:PORT (repeatable: tried in turn, with backoff)")
    boot.add_argument("--overlay-dir", metavar="DIR",
                      help="where the disk overlays are mounted: a secondary's, and a primary's at a switchover "
                      "(default /run/kvmcolo/overlay)")  # fmt: skip
    _add_vm_options(boot, kernel_required=False)
    _add_control_option(boot, serve=True)

    _add_live_copy_command(
        sub, "protect", "make a running guest the COLO primary of a new pair, live",
        "Protect a running guest (a 'kvmcolo run' VMM, or a survivor running alone after a failover) without "
        "stopping it: its RAM is copied to the secondary while it runs, then the rest with its vCPU and device "
        "state in one short stop (at most about --max-downtime), and checkpoints begin. Start the secondary "
        "first, with the same VM options. Waits until the guest is protected, showing the pre-copy's progress.",
        "  hostB# kvmcolo boot --secondary --listen 0.0.0.0:7777 --key-file /etc/kvmcolo.key --image dirty\n"
        "  hostA# kvmcolo protect --peer hostB:7777 --key-file /etc/kvmcolo.key",
        "the secondary's replication address", _add_colo_options)
    _add_live_copy_command(
        sub, "migrate", "move a running guest live to another host",
        "Move a running guest (a 'kvmcolo run' VMM, or a COLO survivor running alone) to a 'kvmcolo boot "
        "--incoming' VMM on another host, without stopping it for longer than about --max-downtime: its RAM is "
        "copied while it runs, then the rest with its vCPU and device state; the destination takes the guest's "
        "taps onto its bridges and announces it on the LAN, and the source VMM ends with status 0. Clients keep "
        "their TCP connections. Refused while COLO protects the guest.",
        "  hostB# kvmcolo boot --incoming --listen 0.0.0.0:7777 --key-file /etc/kvmcolo.key --image netsrv \\\n"
        "             --net tap=tap0,bridge=br0\n"
        "  hostA# kvmcolo migrate --peer hostB:7777 --key-file /etc/kvmcolo.key",
        "the destination's address", _add_precopy_options)

    restore = sub.add_parser(
        "restore",
        help="start a VMM from a snapshot chain",
        description="Start a new VMM from a full snapshot and any incremental ones taken after it "
        "(in order). The disks are reopened and the taps recreated by name; the guest continues "
        "where it was.",
    )
    restore.add_argument("files", nargs="+", metavar="FILE", help="full snapshot, then its increments in order")
    restore.add_argument("--serial-log", metavar="FILE", help="write the guest console to FILE instead of stdout")
    restore.add_argument("--paused", action="store_true", help="hold the guest until 'kvmcolo cont'")
    _add_control_option(restore, serve=True)

    for name, text in (("status", "show a running VMM's state"), ("stop", "pause a running VMM's guest"),
                       ("cont", "resume a paused guest"), ("stats", "show a running VMM's counters"),
                       ("quit", "end a running VMM"), ("failover", "declare the COLO peer lost and go on alone"),
                       ("checkpoint", "ask a COLO primary for a checkpoint now"),
                       ("switchover", "swap a COLO pair's roles, planned (asked of the primary): the secondary "
                        "becomes the primary and this side its secondary, with nothing copied and nothing lost")):  # fmt: skip
        _add_control_option(sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + "."))
    snap = sub.add_parser("snapshot", help="write a snapshot of a running VMM",
                          description="Write a snapshot of a running VMM's guest to FILE (atomically). The "
                          "first one is full; --incremental writes only what changed since the previous one.")  # fmt: skip
    snap.add_argument("file", metavar="FILE")
    snap.add_argument("--incremental", action="store_true", help="only pages dirtied since the previous snapshot")
    _add_control_option(snap)
    sysrq = sub.add_parser("sysrq", help="send a magic SysRq key to the guest's serial console",
                           description="Send a BREAK and then KEY on the guest's serial line: a Linux guest "
                           "with a serial console runs SysRq KEY (h: help, t: tasks, w: blocked tasks, "
                           "c: crash) without its userspace.")  # fmt: skip
    sysrq.add_argument("key", metavar="KEY", help="one character")
    _add_control_option(sysrq)

    sub.add_parser("images", help="build the built-in tiny guests and list them",
                   description="Build (if needed) and list the built-in tiny guests.")  # fmt: skip

    from kvmcolo import demo  # the standard library only: cheap to import here

    demo.add_arguments(sub.add_parser("demo", help=demo.HELP, description=demo.DESCRIPTION))
    return p


def _add_vm_options(parser, kernel_required: bool) -> None:
    what = parser.add_mutually_exclusive_group(required=kernel_required)
    what.add_argument("--kernel", metavar="PATH", help="PVH ELF kernel to boot")
    what.add_argument("--image", metavar="NAME", help="built-in tiny guest (see 'kvmcolo images')")
    parser.add_argument("--cmdline", default="", metavar="S", help="kernel command line")
    parser.add_argument("--mem", default="256M", metavar="SIZE", help="guest RAM, e.g. 256M or 1G (default 256M)")
    parser.add_argument("--cpus", default=1, type=int, metavar="N", help="number of vCPUs (default 1)")
    parser.add_argument("--cpu", default="host", metavar="MODEL",
                        help="CPU features the guest sees: host|base[,+FEATURE|-FEATURE]... (default host; base "
                        "is a portable x86-64 CPU; e.g. host,-pv-send-ipi; the features are listed in "
                        "docs/deploy.md)")  # fmt: skip
    parser.add_argument("--initrd", metavar="PATH", help="initrd / module handed to the kernel")
    parser.add_argument("--serial-log", metavar="FILE", help="write the guest console to FILE instead of stdout")
    parser.add_argument("--disk", action="append", default=[], metavar="PATH[,ro]",
                        help="virtio-blk disk backed by a raw image file (repeatable); ',ro' makes it read-only")
    parser.add_argument("--net", action="append", default=[], metavar="tap[=NAME][,mac=MAC][,bridge=BR]",
                        help="virtio-net on a tap device (repeatable): an existing tap NAME, or a new one "
                        "(removed at exit); default MAC 52:54:00:12:34:56; bridge=BR adds the tap to the host "
                        "bridge BR (a COLO secondary does that only when it takes over)")
    parser.add_argument("--no-ioeventfd", dest="ioeventfd", action="store_false",
                        help="take queue notifications as MMIO exits instead of in-kernel ioeventfds (for measuring)")
    parser.add_argument("guest_args", nargs="*", metavar="-- PARAM", help="words appended to the command line")


def _add_live_copy_command(sub, name: str, summary: str, description: str, example: str, peer: str,
                           add_options) -> None:  # fmt: skip
    """protect and migrate: a command for a running VMM that copies its guest live to --peer."""
    parser = sub.add_parser(name, help=summary, description=description, epilog="Example:\n" + example,
                            formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--peer", required=True, metavar="HOST:PORT", help=peer)
    add_options(parser)
    _add_control_option(parser)


def _add_precopy_options(parser) -> None:
    """The key and the live pre-copy's limits (boot, protect and migrate)."""
    parser.add_argument("--key-file", required=True, metavar="FILE",
                        help="shared secret (>= 16 bytes), same on both hosts")  # fmt: skip
    parser.add_argument("--max-downtime", type=number(float, 1, 60_000, " ms"), default=100, metavar="MS",
                        help="the live pre-copy stops the guest once the rest can be sent in this long (default "
                        "100 ms: below TCP's 200 ms minimum retransmission timeout)")  # fmt: skip
    parser.add_argument("--max-bandwidth", type=number(float, 1, 1_000_000, " MiB/s"), metavar="MIB/S",
                        help="at most this much of the link for the pre-copy (default: all of it)")


def _precopy_options(args) -> dict:
    return {"max_downtime": args.max_downtime / 1000,
            "max_bandwidth": args.max_bandwidth * (1 << 20) if args.max_bandwidth else None}  # fmt: skip


def _add_colo_options(parser) -> None:
    """What a COLO primary and secondary are tuned with (boot and protect)."""
    _add_precopy_options(parser)
    parser.add_argument("--checkpoint-delay", type=number(float, 1, 3_600_000, " ms"), default=100, metavar="MS",
                        help="checkpoint at least this often, in ms (default 100)")
    parser.add_argument("--heartbeat-interval", type=number(float, 1, 60_000, " ms"), default=100, metavar="MS",
                        help="default 100 ms")
    parser.add_argument("--heartbeat-timeout", type=number(float, 10, 600_000, " ms"), default=1000, metavar="MS",
                        help="peer declared lost after this much silence (default 1000 ms)")
    parser.add_argument("--no-resume-early", dest="resume_early", action="store_false",
                        help="keep the primary paused until the secondary has loaded each checkpoint")
    parser.add_argument("--compare-timeout", type=number(float, 1, 60_000, " ms"), default=500, metavar="MS",
                        help="a checkpoint is forced when a primary packet waits this long for the secondary's "
                        "copy (default 500 ms)")
    parser.add_argument("--max-queue", type=number(int, 1, 1_000_000), default=1024, metavar="N",
                        help="held primary packets per connection before a checkpoint is forced (default 1024)")
    parser.add_argument("--fence-command", metavar="CMD",
                        help="run (sh -c) when the peer is lost, before going on alone or taking over: exit 0 = "
                        "the peer is fenced; anything else = this side stops (exit 3) to avoid a split brain")
    parser.add_argument("--verify-every", type=number(int, 0, 1_000_000), default=0, metavar="N",
                        help=argparse.SUPPRESS)  # fmt: skip


def _colo_options(args):
    from kvmcolo.colo_session import ColoOptions

    if args.heartbeat_timeout <= args.heartbeat_interval:  # (each number's range is checked as it is parsed)
        raise UserError("--heartbeat-timeout must be longer than --heartbeat-interval")
    return ColoOptions(checkpoint_delay=args.checkpoint_delay / 1000, heartbeat_interval=args.heartbeat_interval / 1000,
                       heartbeat_timeout=args.heartbeat_timeout / 1000, resume_early=args.resume_early,
                       verify_every=args.verify_every, compare_timeout=args.compare_timeout / 1000,
                       max_queue=args.max_queue, fence_command=args.fence_command, **_precopy_options(args))  # fmt: skip


def _add_control_option(parser, serve: bool = False) -> None:
    if serve:
        parser.add_argument("--control", metavar="PATH",
                            help="control socket to serve (default /run/kvmcolo/kvmcolo-PID.sock)")  # fmt: skip
    else:
        parser.add_argument("--control", metavar="PATH",
                            help="the VMM's control socket (default: the only one in /run/kvmcolo)")  # fmt: skip


def parse_disk(text: str):
    from kvmcolo.machine import DiskSpec

    path, *opts = text.split(",")
    if not path:
        raise UserError(f"--disk {text!r}: no image path")
    for o in opts:
        if o not in ("ro", "rw"):
            raise UserError(f"--disk {text!r}: unknown option {o!r} (use PATH or PATH,ro)")
    return DiskSpec(path, readonly="ro" in opts)


def parse_net(text: str):
    from kvmcolo.machine import NetSpec

    kind, *opts = text.split(",")
    name = None
    if kind.startswith("tap="):
        name = kind[4:]
    elif kind != "tap":
        raise UserError(f"--net {text!r}: only tap backends exist (tap, tap=NAME)")
    spec = NetSpec(tap=name or None)
    for o in opts:
        key, _, value = o.partition("=")
        if key == "mac" and value:
            spec.mac = value
        elif key == "bridge" and value:
            spec.bridge = value
        else:
            raise UserError(f"--net {text!r}: unknown option {o!r} (use mac=52:54:00:.. or bridge=BR)")
    return spec


def _cmd_images(args) -> int:
    from kvmcolo import guest_images

    folder = guest_images.build_dir()
    for name in guest_images.image_names():
        print(f"{name:10} {folder / (name + '.elf')}")
    return 0


def _machine_config(args, boot_kernel: bool = True):
    from kvmcolo import guest_images
    from kvmcolo.machine import MachineConfig

    if args.cpus < 1:
        raise UserError(f"--cpus must be at least 1, got {args.cpus}")
    mem = parse_size(args.mem)
    kernel = ""
    if args.image:
        kernel = str(guest_images.image_path(args.image)) if boot_kernel else args.image
    elif args.kernel:
        kernel = args.kernel
    cmdline = " ".join([args.cmdline, *args.guest_args]).strip()
    return MachineConfig(kernel=kernel, cmdline=cmdline, mem_size=mem, cpus=args.cpus,
                         initrd=args.initrd, serial_output=_open_serial_log(args.serial_log), serial_input=True,
                         disks=[parse_disk(d) for d in args.disk], nets=[parse_net(n) for n in args.net],
                         ioeventfd=args.ioeventfd, cpu=CpuModel.parse(args.cpu))  # fmt: skip


def _cmd_run(args) -> int:
    from kvmcolo.machine import Machine

    config = _machine_config(args)
    machine = Machine(config)
    log.info("booting %s (%s): %d MiB, %d vCPU%s, cmdline %r", config.kernel, machine.kernel_format,
             config.mem_size >> 20, config.cpus, "s" if config.cpus > 1 else "", config.cmdline)  # fmt: skip
    return _serve(machine, args.control, config.serial_output)


def _secondary_overlays(config, overlay_dir):
    """The secondary sees each disk through a FUSE overlay: finish any apply a
    killed run left half done, clear stale mounts, mount, and point the
    machine's disks at the overlay files."""
    from kvmcolo.disk_buffer import OverlayMount
    from kvmcolo.disk_replication import recover
    from kvmcolo.machine import DiskSpec

    root = overlay_dir or "/run/kvmcolo/overlay"
    if os.path.exists(root) and not os.path.isdir(root):
        raise UserError(f"--overlay-dir {root!r} is not a directory")
    OverlayMount.cleanup_stale(root)
    bases, overlays = [], []
    try:
        for spec in config.disks:
            if not os.path.exists(spec.path):
                raise UserError(f"disk image {spec.path!r} does not exist")
            recover(spec.path)
            mount = OverlayMount(spec.path, os.path.join(root, f"{os.getpid()}-{len(overlays)}"))
            overlays.append(mount)
            bases.append(os.path.abspath(spec.path))
    except BaseException:
        for o in overlays:
            o.close()
        raise
    config.disks = [DiskSpec(o.image_path, spec.readonly) for o, spec in zip(overlays, config.disks)]
    return overlays, bases


def _cmd_boot(args) -> int:
    from kvmcolo import control, wire
    from kvmcolo.colo_disk import DiskViews
    from kvmcolo.machine import Machine
    from kvmcolo.vmm import Vmm

    if args.primary and not args.peer:
        raise UserError("boot --primary needs --peer HOST:PORT (the secondary)")
    waits = args.secondary or args.incoming  # for a primary, or for a migration's source
    if waits and not args.listen:
        raise UserError(f"boot --{'secondary' if args.secondary else 'incoming'} needs --listen HOST:PORT")
    if args.primary and not (args.kernel or args.image):
        raise UserError("boot --primary needs --kernel or --image")
    options = _colo_options(args)
    key = wire.load_key(args.key_file)
    standby = [address(s, "--standby") for s in args.standby]
    config = _machine_config(args, boot_kernel=args.primary)
    config.attach_bridges = bool(args.primary)  # the secondary's taps join their bridges at failover
    overlays, bases = [], []
    if waits and config.disks:
        overlays, bases = _secondary_overlays(config, args.overlay_dir)
    else:
        bases = [spec.path for spec in config.disks]
    disks = DiskViews(bases, overlays, args.overlay_dir)
    try:
        machine = Machine(config, boot_kernel=args.primary)
    except BaseException:
        disks.close()
        raise
    if machine.kernel_format:
        log.info("kernel %s: %s", config.kernel, machine.kernel_format)
    try:
        if args.primary:
            from kvmcolo.colo_primary import ColoPrimary

            colo = ColoPrimary(machine, address(args.peer, "--peer"), key, options)
        else:
            from kvmcolo.colo_secondary import ColoSecondary

            colo = ColoSecondary(machine, address(args.listen, "--listen"), key, options, bases, overlays,
                                 incoming=args.incoming)  # fmt: skip
        vmm = Vmm(machine, args.control or control.default_path(), colo, standby, disks)
    except BaseException:
        machine.close()
        disks.close()
        raise
    try:
        result = (vmm.run_colo_primary() if args.primary else vmm.run_incoming() if args.incoming
                  else vmm.run_colo_secondary())  # fmt: skip
    except KeyboardInterrupt:
        log.info("interrupted; stopping the guest")
        return INTERRUPTED_STATUS
    finally:
        machine.close()
        disks.close()  # (after the machine: its disks may be files in these mounts)
        if config.serial_output is not None:
            config.serial_output.close()
    (log.error if result.failed else log.info)("%s", result.reason)
    return result.status


def _cmd_restore(args) -> int:
    from kvmcolo.snapshot import read_chain, restore_machine

    snaps = read_chain(args.files)
    serial_out = _open_serial_log(args.serial_log)
    machine = restore_machine(snaps, serial_output=serial_out, serial_input=True)
    log.info("restored %s (%d file%s); the guest continues", args.files[-1], len(args.files),
             "s" if len(args.files) > 1 else "")  # fmt: skip
    return _serve(machine, args.control, serial_out, paused=args.paused)


def _cmd_protect(args) -> int:
    """Ask a running VMM to protect its guest (protect) or move it (migrate),
    then follow the pre-copy until it is done (0) or the attempt failed (1,
    the guest runs on where it was)."""
    import dataclasses

    from kvmcolo import control, wire
    from kvmcolo.colo_session import COPYING_STATES, ColoOptions

    migrating = args.command == "migrate"
    options = ColoOptions(**_precopy_options(args)) if migrating else _colo_options(args)
    address(args.peer, "--peer")
    key_file = os.path.abspath(args.key_file)
    wire.load_key(key_file)  # a bad key file is this command's mistake: said here, at once
    path = control.find_socket(args.control)
    control.call(path, args.command, {"peer": args.peer, "key_file": key_file,
                                      "options": dataclasses.asdict(options)})  # fmt: skip
    shown, done = None, "migrated" if migrating else "colo"
    while True:
        try:
            c = control.call(path, "query-colo")
        except UserError:  # (the source ends soon after it has migrated; it said so first)
            print(f"kvmcolo: {args.command}: the VMM ended before it said how it went; see its log",
                  file=sys.stderr)  # fmt: skip
            return 1
        p = c.get("precopy") or {}
        line = (f"pre-copy round {p['round']}: {p['sent_mib']} MiB sent, {p['remaining_mib']} MiB left, "
                f"dirty {p['dirty_pages_per_s']} pages/s, expected downtime {p['expected_downtime_ms']} ms"
                + (f", guest throttled {p['throttle_pct']}%" if p.get("throttle_pct") else "")) if p else None  # fmt: skip
        if line and line != shown and c["state"] in COPYING_STATES[1:]:
            print(f"kvmcolo: {line}", file=sys.stderr)
            shown = line
        if c["state"] == done:
            what = "migrated to" if migrating else "protected by"
            print(f"{what} {c['peer']}: {p.get('round')} pre-copy rounds, {p.get('sent_mib')} MiB, "
                  f"downtime {p.get('downtime_ms')} ms")  # fmt: skip
            return 0
        if c["state"] not in COPYING_STATES:
            why = c.get("last_error") or (c.get("internal_errors") or [c["state"]])[-1]
            print(f"kvmcolo: {args.command} failed: {why}; the guest runs on "
                  + ("here" if migrating else "unprotected"), file=sys.stderr)  # fmt: skip
            return 1
        time.sleep(0.1)  # a progress display: the VMM is asked again ten times a second


def _open_serial_log(path):
    if not path:
        return None
    try:
        return open(path, "wb")
    except OSError as e:
        raise UserError(f"cannot write serial log {path!r}: {e.strerror}")


def _serve(machine, control_path, serial_out, paused: bool = False) -> int:
    """Run a built machine with its control socket until the guest ends."""
    from kvmcolo import control
    from kvmcolo.vmm import Vmm

    try:
        vmm = Vmm(machine, control_path or control.default_path())
    except BaseException:
        machine.close()
        raise
    try:
        result = vmm.run(paused=paused)
    except KeyboardInterrupt:
        log.info("interrupted; stopping the guest")
        return INTERRUPTED_STATUS
    finally:
        machine.close()
        vmm.disks.close()  # overlays a switchover mounted (after the machine, whose disks may be in them)
        if serial_out is not None:
            serial_out.close()
    if result.failed:
        log.error("%s", result.reason)
    else:
        log.info("%s", result.reason)
    return result.status


def _cmd_client(args) -> int:
    import json

    from kvmcolo import control

    path = control.find_socket(args.control)
    if args.command == "snapshot":
        result = control.call(path, "snapshot", {"path": os.path.abspath(args.file), "incremental": args.incremental})
        print(f"{result['kind']} snapshot {result['path']}: {result['pages']} pages, {result['bytes']} bytes, "
              f"guest paused {result['pause_ms']:.1f} ms")  # fmt: skip
        return 0
    if args.command == "sysrq":
        if len(args.key) != 1 or not args.key.isprintable():
            raise UserError(f"sysrq: KEY must be one printable character, not {args.key!r}")
        control.call(path, "serial-input", {"data": args.key, "break_first": True})
        return 0
    command = {"status": "query-status", "stats": "query-stats", "failover": "colo-failover"}.get(args.command,
                                                                                                args.command)
    result = control.call(path, command)
    if args.command == "status":
        holds = ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in result.get("holds", {}).items())
        print(f"{result['status']}  pid {result['pid']}  {result['vcpus']} vCPUs  {result['memory_mib']} MiB  "
              f"up {result['uptime_s']:.1f} s" + (f"  (held: {holds})" if holds else ""))  # fmt: skip
        if "colo" in result:
            _print_colo(control.call(path, "query-colo"))
    elif result is not None:
        print(json.dumps(result, indent=2))
    return 0


def _cmd_switchover(args) -> int:
    """Ask the primary to swap roles, then follow until it is the new
    secondary (0) or the switchover failed (1: what happened instead)."""
    from kvmcolo import control

    path = control.find_socket(args.control)
    before = len(control.call(path, "switchover").get("switchovers", []))
    deadline = None
    while True:
        c = control.call(path, "query-colo")
        swapped = c["role"] == "secondary" and c["state"] == "colo"
        if swapped and deadline is None:
            deadline = time.monotonic() + 5  # the new primary's history (with this switchover) follows
        if c["state"] == "switching" or (swapped and len(c["switchovers"]) == before and time.monotonic() < deadline):
            time.sleep(0.05)  # polling the VMM's own progress
            continue
        if swapped:
            done = c["switchovers"][-1] if len(c["switchovers"]) > before else {}
            print(f"switched over: {c['peer']} is the primary now, this side its secondary (the guest stopped "
                  f"{done.get('pause_ms', '?')} ms)")  # fmt: skip
            return 0
        why = c.get("last_error") or (c.get("internal_errors") or [f"COLO is {c['state']}"])[-1]
        print(f"kvmcolo: switchover failed: {why}", file=sys.stderr)
        return 1


def _print_colo(c: dict) -> None:
    from kvmcolo.colo_session import COPYING_STATES

    protection = "protected" if c.get("protected") else "NOT protected"
    print(f"COLO {c['role']}: {c['state']} ({protection}), peer {c['peer']}, {c['checkpoints']} checkpoints "
          f"(reasons: {', '.join(f'{k} {v}' for k, v in c['reasons'].items()) or 'none'})")  # fmt: skip
    for e in c.get("internal_errors") or []:
        print(f"  internal error: {e}")
    if c["recent"]:
        print("  seq  reason        pause ms  dirty pages      bytes  transfer ms  load ms")
        for r in c["recent"][-5:]:
            print(f"  {r['seq']:>3}  {r['reason'][:12]:12}  {r['pause_ms']:8.2f}  {r['dirty_pages']:11}  "
                  f"{r['bytes']:9}  {r['transfer_ms']:11.2f}  {r['load_ms']:7.2f}")  # fmt: skip
    for i, nic in enumerate((c.get("net") or {}).get("nics", [])):
        print(f"  net {i}: " + _net_line(nic))
    p = c.get("precopy")
    if p and c["state"] in COPYING_STATES:
        print(f"  pre-copy round {p['round']}: {p['sent_mib']} MiB sent, {p['remaining_mib']} MiB left, dirty "
              f"{p['dirty_pages_per_s']} pages/s, expected downtime {p['expected_downtime_ms']} ms, ETA {p['eta_s']} s"
              + (f", guest throttled {p['throttle_pct']}%" if p["throttle_pct"] else ""))  # fmt: skip
    if c.get("last_error"):
        print(f"  last attempt failed: {c['last_error']}")
    # The guest's history, whichever host it happened on, in time order.
    events = [(f["time"], f"failover: {f['kind']} ({f['reason']})") for f in c["failovers"]]
    events += [(e["time"], f"protected by {e['peer']}: {e['rounds']} pre-copy rounds, {e['sent_mib']} MiB, "
                           f"downtime {e['downtime_ms']} ms") for e in c.get("protections", [])]  # fmt: skip
    events += [(e["time"], f"migrated in from {e['from']}") for e in c.get("migrations", [])]
    events += [(e["time"], f"switchover: the primary was {e['from']}; the guest stopped {e['pause_ms']} ms")
               for e in c.get("switchovers", [])]  # fmt: skip
    for at, what in sorted(events):
        print(f"  {time.strftime('%H:%M:%S', time.localtime(at))} {what}")


def _net_line(nic: dict) -> str:
    if "matched" in nic:  # the primary's comparator
        mismatches = "/".join(str(nic[f"mismatch_{k}"]) for k in ("tcp", "udp", "icmp", "other"))
        held = f", output held p50 {nic['hold_ms_p50']} ms p99 {nic['hold_ms_p99']} ms" if nic["hold_ms_p50"] else ""
        return (f"matched {nic['matched']}, released {nic['released']}, held now {nic['held']}, passed "
                f"{nic['passthrough']}, mismatches tcp/udp/icmp/other {mismatches}, timeouts {nic['timeouts']}, "
                f"queue full {nic['queue_full']}{held}")  # fmt: skip
    rw = nic["rewriter"]  # the secondary's port
    return (f"delivered {nic['delivered']}, sent {nic['sent']}, dropped at checkpoints {nic['dropped_at_checkpoint']}, "
            f"sequence rewrites in/out {rw['rewritten_in']}/{rw['rewritten_out']}, guest {nic['guest_ip'] or '?'}")


def _setup_logging(args) -> None:
    level = logging.WARNING if args.quiet else (logging.INFO if args.verbose == 0 else logging.DEBUG)
    logging.basicConfig(level=level, format="kvmcolo: %(message)s", stream=sys.stderr)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    # SIGTERM ends the VMM like Ctrl-C: vCPUs stopped, fds closed, status 130+.
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = _build_parser().parse_args(argv)
        _setup_logging(args)
        if args.command == "run":
            return _cmd_run(args)
        if args.command == "images":
            return _cmd_images(args)
        if args.command == "restore":
            return _cmd_restore(args)
        if args.command == "boot":
            return _cmd_boot(args)
        if args.command in ("protect", "migrate"):
            return _cmd_protect(args)
        if args.command == "demo":
            from kvmcolo import demo

            return demo.main(args)
        if args.command == "switchover":
            return _cmd_switchover(args)
        if args.command in ("status", "stop", "cont", "stats", "quit", "snapshot", "failover", "checkpoint", "sysrq"):
            return _cmd_client(args)
        _build_parser().print_help()
        return USER_ERROR_STATUS
    except UserError as e:
        msg = str(e)
        print(msg if msg.startswith("kvmcolo") else f"kvmcolo: {msg}", file=sys.stderr)
        return USER_ERROR_STATUS


if __name__ == "__main__":
    sys.exit(main())
