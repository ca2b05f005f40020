"""`kvmcolo demo`: the whole COLO story in one command, on one machine.

A LAN with a client and two hosts is built from network namespaces
(kvmcolo.lab).  Host B starts a COLO secondary, host A a primary running the
built-in `netsrv` guest, each with `--standby` naming the other host; the
client asks the guest's counter service for the next number over one TCP
connection, steadily.  Live lines show the client and the primary's
checkpoints.  Then host A's VMM is killed with SIGKILL; host B takes over,
announces the guest on the LAN, and the same connection goes on.  Host A
comes back as a secondary and host B protects the guest with it by itself
(the pair heals); then host B is killed too, and host A takes over.  The
summary says whether the client saw one unbroken sequence through both
failures.

Exit status 0 when it did and requests went on after each failover, 1
otherwise.  Everything — processes, namespaces, the temporary folder — is
removed at the end, also on Ctrl-C and SIGTERM.

Only the standard library is imported at module level, so the CLI can add
the demo's options cheaply; the lab and the VMM pieces load in run_demo().
"""

from __future__ import annotations

import argparse
import contextlib
import collections
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable

from kvmcolo.errors import UserError
from kvmcolo.processes import pid_alive

KVM_DEVICE = "/dev/kvm"
TUN_DEVICE = "/dev/net/tun"
DEFAULT_RATE = 20.0
DEFAULT_KILL_AFTER, SHORT_KILL_AFTER = 10.0, 4.0
DEFAULT_RUN_AFTER, SHORT_RUN_AFTER = 8.0, 4.0
HEAL_TIMEOUT = 60.0  # host A restarted as a secondary -> host B protected again (standby backoff + pre-copy)
GUEST_MEM = "128M"
START_TIMEOUT = 30.0  # a VMM's control socket must answer by then
COLO_TIMEOUT = 120.0  # boot + the initial full copy
FAILOVER_TIMEOUT = 15.0  # after the kill: the heartbeat timeout (1 s) and then some
LOG_TAIL = 15

HELP = "show COLO at work: a client keeps its connection while the hosts under the guest die, one after the other"
DESCRIPTION = (
    "Build a small LAN on this machine out of network namespaces (a client and two hosts), run the "
    "built-in netsrv guest under COLO on host A (primary) and host B (secondary), keep a client talking "
    "to it over one TCP connection, kill host A's VMM, and show host B taking over without the client "
    "losing its connection or a single reply; then host A comes back, the pair heals by itself, and host B "
    "is killed too. Needs root and /dev/kvm; cleans up after itself."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--short", action="store_true",
                        help=f"a shorter run (host A dies after {SHORT_KILL_AFTER:g} s, then "
                        f"{SHORT_RUN_AFTER:g} s on host B)")  # fmt: skip
    from kvmcolo.argtypes import number

    parser.add_argument("--requests-per-s", type=number(float, 0.1, 10_000), metavar="N",
                        help=f"the client's request rate (default {DEFAULT_RATE:g})")  # fmt: skip
    parser.add_argument("--kill-after", type=number(float, 0, 3600, " s"), metavar="S",
                        help=f"seconds of COLO before host A is killed (default {DEFAULT_KILL_AFTER:g}; "
                        f"--short {SHORT_KILL_AFTER:g})")  # fmt: skip
    parser.add_argument("--run-after", type=number(float, 0, 3600, " s"), metavar="S",
                        help=f"seconds to watch host B after the failover (default {DEFAULT_RUN_AFTER:g}; "
                        f"--short {SHORT_RUN_AFTER:g})")  # fmt: skip


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # noqa: D401 - argparse's API
        raise UserError(f"{self.prog}: {message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's own command line (for `python -m kvmcolo.demo`)."""
    p = _Parser(prog="kvmcolo demo", description=DESCRIPTION)
    add_arguments(p)
    return p.parse_args(argv)


def timings(args: argparse.Namespace) -> tuple[float, float, float]:
    """(requests per second, kill after s, run after s), defaults filled in."""
    rate = DEFAULT_RATE if args.requests_per_s is None else args.requests_per_s
    kill = args.kill_after if args.kill_after is not None else (SHORT_KILL_AFTER if args.short else DEFAULT_KILL_AFTER)
    run = args.run_after if args.run_after is not None else (SHORT_RUN_AFTER if args.short else DEFAULT_RUN_AFTER)
    if not 0 < rate <= 1000:
        raise UserError(f"--requests-per-s must be between 0 and 1000, got {rate:g}")
    if kill <= 0 or run <= 0:
        raise UserError("--kill-after and --run-after must be positive")
    return rate, kill, run


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """`kvmcolo demo`: 0 if the client's sequence survived the failover, 1 if
    not, 130 when interrupted.  UserError for the CLI to print."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    rate, kill_after, run_after = timings(args)
    try:
        ok = run_demo(args.short, requests_per_s=rate, kill_after=kill_after, run_after=run_after)
    except KeyboardInterrupt:
        print("\ninterrupted; the demo's processes, namespaces and files are gone", flush=True)
        return 130
    return 0 if ok else 1


def check_prerequisites() -> None:
    """UserError naming what is missing: root, /dev/kvm, tun, iproute2."""
    if os.geteuid() != 0:
        raise UserError("the demo must run as root (it creates network namespaces, bridges and taps): "
                        "sudo .venv/bin/kvmcolo demo")  # fmt: skip
    try:
        os.close(os.open(KVM_DEVICE, os.O_RDWR))
    except OSError as e:
        raise UserError(f"the demo needs KVM, and {KVM_DEVICE} is not usable ({e.strerror}): enable "
                        "virtualization or nested virtualization, and load kvm_intel or kvm_amd")  # fmt: skip
    try:
        os.close(os.open(TUN_DEVICE, os.O_RDWR))
    except OSError as e:
        raise UserError(f"the demo needs tun/tap, and {TUN_DEVICE} is not usable ({e.strerror}): modprobe tun")
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            raise UserError(f"the demo needs the '{tool}' command: run ./scripts/setup "
                            "(or apt-get install iproute2 iputils-ping)")  # fmt: skip


def _print(text: str) -> None:
    """print, flushed (live lines must show at once through a pipe too), and
    never failing on a terminal that cannot show the box-drawing characters."""
    try:
        print(text, flush=True)
    except UnicodeEncodeError:
        enc = sys.stdout.encoding or "ascii"
        print(text.encode(enc, "replace").decode(enc), flush=True)


def run_demo(short: bool = False, out: Callable[[str], object] = _print, *, requests_per_s: float | None = None,
             kill_after: float | None = None, run_after: float | None = None) -> bool:  # fmt: skip
    """The whole story; True when the client saw one unbroken counter
    sequence on one connection and got replies after the failover."""
    demo = _Demo(out,
                 rate=requests_per_s or DEFAULT_RATE,
                 kill_after=kill_after or (SHORT_KILL_AFTER if short else DEFAULT_KILL_AFTER),
                 run_after=run_after or (SHORT_RUN_AFTER if short else DEFAULT_RUN_AFTER))  # fmt: skip
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        return demo.run()
    finally:
        if in_main:  # a second Ctrl-C must not cut the teardown short
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            demo.teardown()
        finally:
            if in_main:
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, old_term)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Failed(Exception):
    """The story cannot go on; the message says why (logs are shown)."""

    def __init__(self, message: str, logs: tuple[str, ...] = ()):
        super().__init__(message)
        self.logs = logs


class _Demo:
    def __init__(self, out, rate: float, kill_after: float, run_after: float):
        self.out = out
        self.rate = rate
        self.kill_after = kill_after
        self.run_after = run_after
        self.t0 = time.monotonic()
        self.tmp: str | None = None
        self.lab = None
        self.pair = None  # lab.ColoLab: the two VMMs (the harness the tests and the benchmark use too)
        self.logs: dict[str, object] = {}
        self.client = None
        self.killed_at: float | None = None  # monotonic, the first kill
        self.failover_at: float | None = None
        self.failover: dict | None = None
        self.failovers = 0  # seen so far
        self.healed = False
        self._last_line_at = 0.0

    # ---- output

    def say(self, text: str) -> None:
        self.out(f"[{time.monotonic() - self.t0:5.1f}s] {text}")

    def intro(self) -> None:
        from kvmcolo.lab import CLIENT_ADDR, GUEST_ADDR, REPL_A, REPL_B

        left = f"  client {CLIENT_ADDR} ── LAN switch ──"
        self.out("kvmcolo demo: one guest on two hosts in lock-step; host A dies, comes back, then host B dies.\n"
                 "\n"
                 f"{left}┬── host A: primary    runs the guest (netsrv, {GUEST_ADDR})\n"
                 f"{' ' * len(left)}└── host B: secondary  a checkpointed copy of it\n"
                 f"  host A {REPL_A} ═══ replication link ═══ {REPL_B} host B\n"
                 "  (four network namespaces on this machine)\n"
                 "\n"
                 f"The client asks the guest for the next number {self.rate:g} times a second, over one TCP\n"
                 "connection. With COLO it should see 1, 2, 3, ... without a gap, a duplicate or a reset,\n"
                 "although the host it talks to is killed — twice.\n")  # fmt: skip

    # ---- the story

    def run(self) -> bool:
        check_prerequisites()
        self.intro()
        try:
            self.setup()
            self.start_vmms()
            self.start_client()
            self.watch("A", until=time.monotonic() + self.kill_after)
            self.kill("A")
            self.wait_failover("B")
            self.watch("B", until=time.monotonic() + min(2.0, self.run_after / 2), both=False)
            self.heal(comes_back="A", survivor="B")
            self.watch("B", until=time.monotonic() + self.kill_after / 2)
            self.kill("B")
            self.wait_failover("A")
            self.watch("A", until=time.monotonic() + self.run_after, both=False)
        except _Failed as e:
            self.say(f"FAILED: {e}")
            for side in e.logs:
                self.show_log(side)
            if self.client is not None:
                self.client.stop(timeout=1)
                self.summary()
            return False
        self.client.stop(timeout=2)
        return self.summary()

    def setup(self) -> None:
        from kvmcolo import guest_images
        from kvmcolo.lab import ColoLab, Lab, LabError, remove_stale_namespaces

        stale = remove_stale_namespaces() + _remove_stale_folders()
        if stale:
            self.say(f"removed what a killed earlier run left behind: {', '.join(stale)}")
        guest_images.image_path("netsrv")  # built once here, not by both VMMs at once
        self.tmp = tempfile.mkdtemp(prefix=f"kvmcolo-demo-{os.getpid()}-")
        try:
            self.lab = Lab()
        except LabError as e:
            raise UserError(str(e)) from None
        self.pair = ColoLab(self.lab, self.tmp, self._spawn, mem=GUEST_MEM)
        self.say("LAN ready: namespaces client, hostA, hostB and the switch; a fresh random key in " + self.tmp)

    @property
    def procs(self) -> dict:
        return self.pair.procs if self.pair is not None else {}

    def standby(self, side: str) -> list[str]:
        from kvmcolo.lab import REPL_PORT, other_addr

        return ["--standby", f"{other_addr(side)}:{REPL_PORT}"]

    def start_vmms(self) -> None:
        from kvmcolo.lab import GUEST_ADDR, REPL_B, REPL_PORT

        with _as_failure():
            self.pair.start("B", self.standby("B"))
            self.pair.wait_control("B", START_TIMEOUT)
            self.say(f"host B: secondary VMM started (pid {self.procs['B'].pid}), waiting for the primary on "
                     f"{REPL_B}:{REPL_PORT}")  # fmt: skip
            self.pair.start("A", self.standby("A"))
            self.pair.wait_control("A", START_TIMEOUT)
            self.say(f"host A: primary VMM started (pid {self.procs['A'].pid}), booting the guest and copying it "
                     "to host B")  # fmt: skip
            c = self.pair.wait_colo(COLO_TIMEOUT)
        self.wait_ready()
        n = c["checkpoints"]
        self.say(f"COLO is running: {n} checkpoint{'s' if n != 1 else ''} so far; the guest serves {GUEST_ADDR} "
                 "from host A, every output packet compared with host B's copy")  # fmt: skip

    def _spawn(self, side: str, argv: list[str]) -> subprocess.Popen:
        """One VMM, its output into the side's log (`ip netns exec` execs
        kvmcolo: the pid is the VMM's)."""
        log = open(self.log_path(side), "wb")
        self.logs[side] = log
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=_die_with_parent)  # fmt: skip

    def log_path(self, side: str) -> str:
        return os.path.join(self.tmp, f"host{side}.log")

    def query(self, side: str) -> dict | None:
        """query-colo, or None when the VMM does not answer."""
        return self.pair.query(side)

    def check_alive(self, side: str, what: str) -> None:
        with _as_failure():
            self.pair.check_alive(side, what)

    def wait_ready(self, timeout: float = 30) -> None:
        """The guest's console says its services are up (the primary's log)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive("A", "before the guest was ready")
            with open(self.log_path("A"), "rb") as f:
                if b"netsrv: ready" in f.read():
                    return
            time.sleep(0.1)
        raise _Failed(f"the guest did not report ready within {timeout:g} s", ("A",))

    def start_client(self) -> None:
        from kvmcolo.lab import CLIENT_ADDR, COUNTER_PORT, GUEST_ADDR, CounterClient, CounterError

        try:
            self.client = CounterClient(self.lab.client, GUEST_ADDR, COUNTER_PORT, timeout=30)
        except CounterError as e:
            raise _Failed(f"the client could not reach the guest: {e}", ("A", "B")) from None
        self.client.start(self.rate)
        self.say(f"client {CLIENT_ADDR} connected to {GUEST_ADDR}:{COUNTER_PORT}; "
                 f"one request every {1000 / self.rate:g} ms")  # fmt: skip

    def watch(self, side: str, until: float, both: bool = True) -> None:
        """A live line about once a second until `until` (`both`: the other
        host's VMM must be alive too)."""
        self._last_line_at = time.monotonic()
        while True:
            left = until - time.monotonic()
            time.sleep(max(0.0, min(1.0, left)))
            self.check_alive(side, "unexpectedly")
            if both:
                self.check_alive("B" if side == "A" else "A", "unexpectedly")
            self.live_line(side)
            if self.client.error:
                raise _Failed(f"the client stopped: {self.client.error}", ("A", "B"))
            if time.monotonic() >= until:
                return

    def live_line(self, side: str) -> None:
        now = time.monotonic()
        since, self._last_line_at = self._last_line_at, now
        c = self.query(side)
        records = list(self.client.records)
        if records:
            last_t, last_n, _ = records[-1]
            window = [lat for t, _, lat in records if t >= since]
            if window:
                lat = sorted(window)[len(window) // 2]
                client = f"client {len(records)} replies, last {last_n}, p50 {_ms(lat)}"
            else:
                client = f"client {len(records)} replies, last {last_n}, waiting {now - last_t:.1f} s for a reply"
        else:
            client = "client: no reply yet"
        if self.client.error:
            client += f" [stopped: {self.client.error}]"
        parts = [f"host {side}", client]
        if c is None:
            parts.append("(no answer on the control socket)")
        elif c.get("state") == "colo" and c.get("role") == "primary":
            reasons = ", ".join(f"{_short_reason(k)} {v}" for k, v in sorted(c.get("reasons", {}).items(),
                                                                          key=lambda kv: -kv[1]))  # fmt: skip
            cp = f"{c['checkpoints']} checkpoints" + (f" ({reasons})" if reasons else "")
            if c.get("recent"):
                cp += f", last pause {c['recent'][-1]['pause_ms']:.1f} ms"
            parts.append(cp)
        else:
            state = {"connecting": "alone, calling its standby host", "reprotecting": "alone, copying the guest to "
                     "its standby host"}.get(c["state"], c["state"])  # fmt: skip
            parts.append(f"{state}: the guest runs here alone")
        net = _net_summary(c.get("net") if c and c.get("state") == "colo" else None)
        if net:
            parts.append(net)
        self.say(" | ".join(parts))

    def kill(self, side: str) -> None:
        proc = self.procs[side]
        self.last_kill_at = time.monotonic()
        if self.killed_at is None:
            self.killed_at = self.last_kill_at
        self.killed_wall = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self.say(f"*** host {side} dies: its VMM (pid {proc.pid}) is killed with SIGKILL — "
                 "no goodbye, no last checkpoint ***")  # fmt: skip

    def wait_failover(self, survivor: str) -> None:
        dead = "A" if survivor == "B" else "B"
        deadline = time.monotonic() + FAILOVER_TIMEOUT
        next_line = time.monotonic() + 1
        while time.monotonic() < deadline:
            self.check_alive(survivor, f"after host {dead} died")
            c = self.query(survivor)
            if c and len(c.get("failovers") or ()) > self.failovers:  # (a secondary knows its primary's history)
                self.failovers = len(c["failovers"])
                self.failover_at = time.monotonic()
                self.failover = c["failovers"][-1]
                took = self.failover.get("time", self.killed_wall) - self.killed_wall
                why = self.failover.get("reason")
                self.say(f"host {survivor} took over {max(0.0, took):.2f} s after the kill" +
                         (f" ({why})" if why else "") + "; it announces the guest on the LAN (RARP + gratuitous "
                         "ARP)")  # fmt: skip
                self.show_switch_port(survivor)
                return
            if time.monotonic() >= next_line:
                next_line += 1
                self.live_line(survivor)
            time.sleep(0.02)
        raise _Failed(f"host {survivor} did not take over within {FAILOVER_TIMEOUT:g} s", (survivor,))

    def heal(self, comes_back: str, survivor: str) -> None:
        """The dead host comes back as a secondary; the survivor's --standby
        finds it and protects the guest again, live, by itself."""
        with _as_failure():
            self.pair.start(comes_back, self.standby(comes_back), role="secondary")
            self.pair.wait_control(comes_back, START_TIMEOUT)
        self.say(f"host {comes_back} is back: a new secondary VMM (pid {self.procs[comes_back].pid}) waits for "
                 f"host {survivor}, which runs the guest alone")  # fmt: skip
        started = time.monotonic()
        deadline = started + HEAL_TIMEOUT
        while time.monotonic() < deadline:
            self.check_alive(survivor, "while healing")
            self.check_alive(comes_back, "while healing")
            c = self.query(survivor)
            if c and c.get("state") == "colo" and c.get("checkpoints", 0) > 0:
                p = (c.get("protections") or [{}])[-1]
                self.healed = True
                self.say(f"healed: host {survivor} protected the guest with host {comes_back} by itself "
                         f"({p.get('rounds')} pre-copy rounds, {p.get('sent_mib')} MiB, the guest stopped "
                         f"{p.get('downtime_ms')} ms) — host {survivor} is the primary now")  # fmt: skip
                return
            time.sleep(0.05)
        raise _Failed(f"host {survivor} was not protected again within {HEAL_TIMEOUT:g} s", (survivor, comes_back))

    def switch_port(self) -> str | None:
        """Which host the LAN switch sends the guest's MAC to, from its table."""
        from kvmcolo.lab import GUEST_MAC

        try:
            fdb = self.lab.lan.run("bridge", "fdb", "show", "br", "lan0", timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in fdb.splitlines():
            words = line.split()
            if words and words[0].lower() == GUEST_MAC and "dev" in words:
                port = words[words.index("dev") + 1]
                return {"portA": "host A", "portB": "host B", "portC": "the client"}.get(port, port)
        return None

    def show_switch_port(self, side: str, timeout: float = 2.0) -> None:
        deadline = time.monotonic() + timeout
        while (where := self.switch_port()) != f"host {side}" and time.monotonic() < deadline:
            time.sleep(0.05)
        if where == f"host {side}":
            self.say(f"LAN switch: the guest's MAC address has moved to host {side}'s port")
        else:
            self.say(f"LAN switch: the guest's MAC address is still on {where or 'no port'} "
                     "(the announcement is missing)")  # fmt: skip

    # ---- the end

    def summary(self) -> bool:
        client = self.client
        records = list(client.records)
        kill = self.killed_at if self.killed_at is not None else float("inf")
        before = sum(1 for t, _, _ in records if t < kill)
        after = len(records) - before
        problems = client.check_sequence()
        gap, gap_end = client.longest_gap()
        normal = 1 / self.rate
        last_kill = getattr(self, "last_kill_at", kill)
        final = sum(1 for t, _, _ in records if t >= last_kill) if last_kill != kill else after
        self.out("\nsummary")
        if records:
            self.out(f"  replies   {before} before host A died, {after} after (of them {final} after the last "
                     f"failure; counter {records[0][1]} → {records[-1][1]})")  # fmt: skip
            self.out(f"  failures  {self.failovers} host{'s' if self.failovers != 1 else ''} died, each survived; "
                     f"the pair {'healed by itself in between' if self.healed else 'did not heal'}")  # fmt: skip
        else:
            self.out("  replies   none")
        if len(records) > 1:
            where = " — the failover" if self.killed_at is not None and gap_end >= kill else ""
            self.out(f"  longest   {gap:.2f} s between two replies{where} (normally {normal * 1000:g} ms)")
        seq = "no gap, no duplicate" if not problems else "; ".join(problems[:3]) + (
            f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")  # fmt: skip
        conn = "one TCP connection, never reset" if client.error is None else f"connection lost: {client.error}"
        self.out(f"  sequence  {seq}; {conn}")
        failures = []
        if self.failovers < 2:
            failures.append(f"{self.failovers} failovers happened, not 2")
        if not self.healed:
            failures.append("the pair did not heal")
        if problems:
            failures.append("the counter sequence broke")
        if client.error is not None:
            failures.append("the client's connection failed")
        if final == 0:
            failures.append("no reply after the last failure")
        elif client.error is None and records and time.monotonic() - records[-1][0] > max(2.0, 5 / self.rate):
            failures.append(f"the guest stopped answering ({time.monotonic() - records[-1][0]:.1f} s without a reply)")
        if failures:
            self.out(f"  result    FAIL: {'; '.join(failures)}")
            return False
        self.out("  result    PASS: both hosts died, one after the other, and the client noticed nothing but two "
                 "short pauses")
        return True

    def show_log(self, side: str) -> None:
        path = self.log_path(side) if self.tmp else None
        if not path or not os.path.exists(path):
            return
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()[-LOG_TAIL:]
        self.out(f"--- last lines of host {side}'s VMM log ---")
        for line in lines:
            self.out("  " + line)

    def teardown(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass
        if self.pair is not None:
            self.pair.stop(timeout=10)
        for log in self.logs.values():
            log.close()
        if self.lab is not None:
            self.lab.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


_FOLDER_RE = re.compile(r"^kvmcolo-demo-(\d+)-")


@contextlib.contextmanager
def _as_failure():
    """The pair harness's errors as the demo's: a FAILED line and the logs."""
    from kvmcolo.lab import ColoLabError

    try:
        yield
    except ColoLabError as e:
        raise _Failed(str(e), e.sides) from None


def _remove_stale_folders() -> list[str]:
    """Temporary folders of demos that no longer run (their names carry the pid)."""
    removed = []
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return []
    for name in names:
        m = _FOLDER_RE.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def _die_with_parent() -> None:
    """In the child: SIGTERM when the demo's thread that started it ends
    (even if the demo is SIGKILLed), so no VMM outlives the demo."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.0f} s"


_REASON_WORDS = re.compile(r"[^a-z0-9]+")


def _short_reason(reason: str) -> str:
    """'periodic', 'requested on the control socket' -> 'requested', ..."""
    words = [w for w in _REASON_WORDS.split(reason.lower()) if w]
    return "-".join(words[:2]) if words else "?"


# Comparator counters worth a live line, in order; mismatch_* are summed.
_NET_KEYS = ("matched", "released", "held")


def _net_summary(net: dict | None) -> str:
    """A compact line from query-colo's "net" (per-NIC counter dicts under
    "nics", summed over NICs); '' when there is none."""
    if not net or not isinstance(net, dict):
        return ""
    totals: collections.Counter = collections.Counter()
    for nic in net.get("nics", []) or []:
        if isinstance(nic, dict):
            for k, v in nic.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("hold_"):
                    totals[k] += v
    if not totals:
        return ""
    mismatches = sum(v for k, v in totals.items() if k.startswith("mismatch"))
    shown = [f"{k} {totals[k]:g}" for k in _NET_KEYS if k in totals]
    if not shown:  # another side's counters (the secondary's): the first few non-zero ones
        shown = [f"{k} {v:g}" for k, v in totals.items() if v and k not in ("epoch",)][:4]
    if mismatches or any(k.startswith("mismatch") for k in totals):
        shown.append(f"mismatches {mismatches:g}")
    holds = [nic.get("hold_ms_p50") for nic in net.get("nics", []) if isinstance(nic, dict)]
    if holds and holds[0] is not None:  # what COLO adds to a reply: waiting for host B's copy
        shown.append(f"output held p50 {holds[0]:.2f} ms")
    return "net: " + ", ".join(shown)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except UserError as e:
        print(f"kvmcolo: {e}", file=sys.stderr)
        sys.exit(2)
