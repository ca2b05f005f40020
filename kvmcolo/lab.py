"""One machine playing a LAN with three hosts: the demo's and the end-to-end
tests' stage.

Four network namespaces (kvmcolo.netns; names carry the pid and are always
deleted again):

    client  eth0 10.77.0.10/24 ───────────┐
                                          │  lan: bridge lan0 (the LAN switch)
    hostA   brA ── lanA (uplink) ─────────┤
            repA 192.168.99.1/24 ─┐       │
                                  │ replication link (veth)
            repB 192.168.99.2/24 ─┘       │
    hostB   brB ── lanB (uplink) ─────────┘

brA and brB stand for each host's br0: bridges without an address whose
uplink is a port of the LAN switch.  A VMM attaches the guest's tap to its
host's bridge (`--net tap=tapA,bridge=brA`; a COLO secondary only when it
takes over).  The guest keeps one MAC and one address, GUEST_ADDR; after a
failover the new active side announces it, so lan0 learns the new path.

Bridges forward at once (STP off, forward delay 0) and keep the kernel's
default MAC ageing (300 s), as a real switch would: only the announcement
moves the guest's MAC to the other port.  IPv6 is off in every namespace so
the only traffic on the LAN is what the demo or a test makes.

CounterClient talks to netsrv's counter service (images/netsrv.c) over one
long TCP connection from the client namespace and checks that the replies
form one unbroken sequence.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from kvmcolo.netns import Namespace
from kvmcolo.processes import pid_alive

GUEST_ADDR = "10.77.0.2"
CLIENT_ADDR = "10.77.0.10"
LAN_PREFIX = 24
GUEST_MAC = "52:54:00:12:34:56"
REPL_A = "192.168.99.1"
REPL_B = "192.168.99.2"
REPL_PREFIX = 24
REPL_PORT = 7777
COUNTER_PORT = 9000
GUEST_IMAGE = "netsrv"

# Per side: the namespace attribute, the host bridge, the uplink veth, the
# guest's tap, the replication interface and address.
SIDES = {
    "A": {"ns": "host_a", "bridge": "brA", "uplink": "lanA", "tap": "tapA", "repl": "repA", "addr": REPL_A},
    "B": {"ns": "host_b", "bridge": "brB", "uplink": "lanB", "tap": "tapB", "repl": "repB", "addr": REPL_B},
}
_SIDE_ALIASES = {"a": "A", "hosta": "A", "primary": "A", "b": "B", "hostb": "B", "secondary": "B"}


def side_name(side: str) -> str:
    """'A' or 'B' from 'A', 'hostA', 'primary', 'B', 'hostB', 'secondary'."""
    try:
        return _SIDE_ALIASES[side.lower()]
    except KeyError:
        raise ValueError(f"unknown side {side!r}: use 'A' (primary) or 'B' (secondary)") from None


def kvmcolo_command() -> list[str]:
    """argv that runs this kvmcolo (the same Python, wherever it is installed)."""
    return [sys.executable, "-m", "kvmcolo.cli"]


def boot_args(side: str, key_file: str, control: str, extra: Sequence[str] = (), guest_args: Sequence[str] = (),
              mem: str | None = None, exe: Sequence[str] | None = None,
              guest: Sequence[str] | None = None, role: str | None = None) -> list[str]:  # fmt: skip
    """The `kvmcolo boot` argv for host A (the primary) or host B (the
    secondary) of the lab, running the built-in netsrv guest at GUEST_ADDR.
    Run it inside that host's namespace (`lab.host_a.cmd(*argv)`).  `extra`
    goes before the VM options, `guest_args` after `--` (primary only: the
    secondary gets its guest from the primary).  `guest`: other VM options
    instead of netsrv's (a kernel, its disk and command line, which must
    configure GUEST_ADDR itself); the lab's NIC is added to them.  `role`:
    "primary", "secondary" or "incoming" (default: A is the primary, B the
    secondary; after a failover the dead host comes back as the survivor's
    secondary)."""
    s = side_name(side)
    role = role or ("primary" if s == "A" else "secondary")
    argv = [*(kvmcolo_command() if exe is None else exe), "boot"]
    if role == "primary":
        argv += ["--primary", "--peer", f"{other_addr(s)}:{REPL_PORT}"]
    else:  # "secondary", or "incoming" (a live migration's destination)
        argv += [f"--{role}", "--listen", f"{SIDES[s]['addr']}:{REPL_PORT}"]
    argv += ["--key-file", str(key_file), "--control", str(control), *extra]
    return argv + _vm_args(s, mem, guest, guest_args if role == "primary" else ())


def other_addr(side: str) -> str:
    """The replication address of the other host."""
    return SIDES["B" if side_name(side) == "A" else "A"]["addr"]


def run_args(control: str, extra: Sequence[str] = (), guest_args: Sequence[str] = (), mem: str | None = None,
             guest: Sequence[str] | None = None) -> list[str]:  # fmt: skip
    """The `kvmcolo run` argv of an unprotected guest on host A of the lab
    (the same VM as boot_args'), for `kvmcolo protect` to protect later."""
    return [*kvmcolo_command(), "run", "--control", str(control), *extra, *_vm_args("A", mem, guest, guest_args)]


def _vm_args(s: str, mem: str | None, guest: Sequence[str] | None, guest_args: Sequence[str]) -> list[str]:
    sd = SIDES[s]
    argv = [*(guest if guest is not None else ["--image", GUEST_IMAGE]), "--net", f"tap={sd['tap']},bridge={sd['bridge']}"]
    if mem:
        argv += ["--mem", mem]
    if guest is None:
        argv += ["--", f"ip={GUEST_ADDR}"]
    if guest_args:
        argv += [*([] if guest is None else ["--"]), *guest_args]
    return argv


class LabError(Exception):
    """The lab could not be built (an `ip` command failed); the message says which."""


class ColoLabError(LabError):
    """A COLO pair on the lab did not come up; `sides` says whose log to read."""

    def __init__(self, message: str, sides: Sequence[str]):
        super().__init__(message)
        self.sides = tuple(sides)


def _popen(proc):
    """The subprocess.Popen of what a spawn function returned (a Popen, or
    an object wrapping one as `.proc`)."""
    return getattr(proc, "proc", proc)


class ColoLab:
    """netsrv under COLO on the lab: the secondary on host B, the primary on
    host A, as two real `kvmcolo boot` processes.  The one pair harness the
    end-to-end tests, the network benchmark and the demo share; each says how
    a VMM process is started (`spawn(side, argv)`: a Popen, or an object
    with the Popen as `.proc`) and what it does with its output."""

    def __init__(self, lab: Lab, folder: str, spawn, mem: str | None = None, guest=None):
        self.lab = lab
        self.folder = folder
        self.spawn = spawn
        self.mem = mem
        self.guest = guest  # side -> VM options instead of netsrv's (boot_args' `guest`), or None
        self.procs: dict[str, object] = {}
        self.key = os.path.join(folder, "colo.key")
        fd = os.open(self.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(32).hex().encode() + b"\n")

    def sock(self, side: str) -> str:
        return os.path.join(self.folder, f"{side_name(side).lower()}.sock")

    def start(self, side: str, extra: Sequence[str] = (), guest_args: Sequence[str] = (), role: str | None = None):
        s = side_name(side)
        guest = self.guest(s) if self.guest is not None else None
        argv = self.lab.host(s).cmd(*boot_args(s, self.key, self.sock(s), extra, guest_args, mem=self.mem,
                                               guest=guest, role=role))  # fmt: skip
        self.procs[s] = self.spawn(s, argv)
        return self.procs[s]

    def start_alone(self, extra: Sequence[str] = (), guest_args: Sequence[str] = ()):
        """The guest on host A as a lone, unprotected `kvmcolo run` VMM."""
        guest = self.guest("A") if self.guest is not None else None
        argv = self.lab.host("A").cmd(*run_args(self.sock("A"), extra, guest_args, mem=self.mem, guest=guest))
        self.procs["A"] = self.spawn("A", argv)
        return self.procs["A"]

    def protect(self, extra: Sequence[str] = (), timeout: float = 120,
                command: str = "protect") -> subprocess.CompletedProcess:  # fmt: skip
        """`kvmcolo protect` (or `migrate`) of host A's guest, host B's VMM
        as the secondary (or the destination)."""
        argv = [*kvmcolo_command(), command, "--peer", f"{REPL_B}:{REPL_PORT}", "--key-file", self.key,
                "--control", self.sock("A"), *extra]  # fmt: skip
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def start_pair(self, primary: Sequence[str] = (), secondary: Sequence[str] = (), guest_args: Sequence[str] = (),
                   start_timeout: float = 60, colo_timeout: float = 120) -> dict:  # fmt: skip
        """Secondary, then primary; returns query-colo of the primary once
        its first checkpoint is done."""
        self.start("B", secondary)
        self.wait_control("B", start_timeout)
        self.start("A", primary, guest_args)
        self.wait_control("A", start_timeout)
        return self.wait_colo(colo_timeout)

    def query(self, side: str, command: str = "query-colo", timeout: float = 5) -> dict | None:
        """A control-socket command's answer, or None when the VMM does not answer."""
        from kvmcolo import control
        from kvmcolo.errors import UserError

        try:
            return control.call(self.sock(side), command, timeout=timeout)
        except (UserError, OSError, ValueError):
            return None

    def check_alive(self, side: str, what: str) -> None:
        s = side_name(side)
        proc = _popen(self.procs[s])
        if proc.poll() is not None:
            raise ColoLabError(f"host {s}'s VMM exited with status {proc.returncode} {what}", (s,))

    def wait_control(self, side: str, timeout: float = 60) -> None:
        s = side_name(side)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive(s, "while starting")
            if os.path.exists(self.sock(s)) and self.query(s, "query-status") is not None:
                return
            time.sleep(0.05)
        raise ColoLabError(f"host {s}'s VMM did not answer on its control socket within {timeout:g} s", (s,))

    def wait_colo(self, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for s in "AB":
                self.check_alive(s, "before COLO was running")
            c = self.query("A")
            if c and c.get("checkpoints", 0) > 0:
                return c
            time.sleep(0.05)
        raise ColoLabError(f"no checkpoint within {timeout:g} s", ("A", "B"))

    def stop(self, timeout: float = 5) -> None:
        """Both VMMs ended (SIGTERM, then SIGKILL after `timeout`)."""
        for proc in map(_popen, self.procs.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in map(_popen, self.procs.values()):
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class Lab:
    """The four namespaces and their links.  close() is idempotent and never
    raises; a Lab that fails half-way through building removes what it made.
    `tag` is put in front of the namespace roles, for running two labs in one
    process."""

    def __init__(self, tag: str = ""):
        self.lan: Namespace | None = None
        self.client: Namespace | None = None
        self.host_a: Namespace | None = None
        self.host_b: Namespace | None = None
        self._closed = False
        try:
            self.lan = Namespace(tag + "lan")
            self.client = Namespace(tag + "client")
            self.host_a = Namespace(tag + "hostA")
            self.host_b = Namespace(tag + "hostB")
            self._build()
        except subprocess.CalledProcessError as e:
            self.close()
            detail = (e.stderr or "").strip().splitlines()
            raise LabError(f"building the lab failed: {' '.join(map(str, e.cmd))}: "
                           f"{detail[-1] if detail else f'exit status {e.returncode}'}") from None  # fmt: skip
        except BaseException:
            self.close()
            raise

    @property
    def namespaces(self) -> list[Namespace]:
        return [ns for ns in (self.lan, self.client, self.host_a, self.host_b) if ns is not None]

    def host(self, side: str) -> Namespace:
        return getattr(self, SIDES[side_name(side)]["ns"])

    def _build(self) -> None:
        for ns in self.namespaces:
            _quiet_ipv6(ns)
        lan = self.lan
        lan.ip("link", "add", "lan0", "type", "bridge", "stp_state", "0", "forward_delay", "0")
        lan.ip("link", "set", "lan0", "up")

        # The client: one interface on the LAN.
        lan.ip("link", "add", "portC", "type", "veth", "peer", "name", "eth0", "netns", self.client.name)
        lan.ip("link", "set", "portC", "master", "lan0", "up")
        self.client.ip("addr", "add", f"{CLIENT_ADDR}/{LAN_PREFIX}", "dev", "eth0")
        self.client.ip("link", "set", "eth0", "up")

        # Each host: a bridge without an address (its br0), uplinked to the LAN.
        for s, sd in SIDES.items():
            host = self.host(s)
            host.ip("link", "add", sd["bridge"], "type", "bridge", "stp_state", "0", "forward_delay", "0")
            host.ip("link", "add", sd["uplink"], "type", "veth", "peer", "name", f"port{s}", "netns", lan.name)
            host.ip("link", "set", sd["uplink"], "master", sd["bridge"], "up")
            host.ip("link", "set", sd["bridge"], "up")
            lan.ip("link", "set", f"port{s}", "master", "lan0", "up")

        # The replication link.
        a, b = SIDES["A"], SIDES["B"]
        self.host_a.ip("link", "add", a["repl"], "type", "veth", "peer", "name", b["repl"], "netns", self.host_b.name)
        for s, sd in SIDES.items():
            self.host(s).ip("addr", "add", f"{sd['addr']}/{REPL_PREFIX}", "dev", sd["repl"])
            self.host(s).ip("link", "set", sd["repl"], "up")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ns in reversed(self.namespaces):
            try:
                ns.delete()
            except Exception:  # noqa: BLE001 - close never raises; a leftover carries our pid
                pass

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_NAME_RE = re.compile(r"^kvmcolo-[A-Za-z0-9]*?(?:lan|client|hostA|hostB)-(\d+)$")  # with or without a Lab tag


def remove_stale_namespaces() -> list[str]:
    """Delete lab namespaces left by a process that no longer exists (one
    killed with SIGKILL could not clean up); their names carry its pid."""
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    removed = []
    for line in listed.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME_RE.match(name)
        if m and not pid_alive(int(m.group(1))):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
            removed.append(name)
    return removed


def _quiet_ipv6(ns: Namespace) -> None:
    """IPv6 off (no router solicitations, DAD or MLD on the LAN).  Best effort:
    a kernel without IPv6 has nothing to switch off."""
    with ns.entered():
        for conf in ("default", "all"):
            try:
                with open(f"/proc/sys/net/ipv6/conf/{conf}/disable_ipv6", "w") as f:
                    f.write("1")
            except OSError:
                pass


# ---- the counter client ------------------------------------------------------------------------

_REPLY_RE = re.compile(rb"^(\d{1,20})\n$")


class CounterError(Exception):
    """The counter service broke its promise: a malformed reply, a closed or
    reset connection, or no reply in time."""


class CounterClient:
    """One long TCP connection to netsrv's counter service.

    Every request is one line; the reply is "<n>\\n" with n one more than the
    last reply any client got.  The client never reconnects: a connection
    error ends it and is kept in `.error`.  `start(rate)` runs requests in a
    background thread at a steady rate, recording (time, n, latency) in
    `.records` (time = monotonic time the reply arrived)."""

    def __init__(self, ns: Namespace | None, addr: str = GUEST_ADDR, port: int = COUNTER_PORT,
                 timeout: float = 30.0, connect_timeout: float = 10.0):  # fmt: skip
        self.addr = (addr, port)
        self.timeout = timeout
        self.records: list[tuple[float, int, float]] = []
        self.error: str | None = None
        self.last_line: bytes | None = None
        self._buf = bytearray()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one request at a time
        try:
            if ns is not None:
                with ns.entered():
                    self.sock = socket.create_connection(self.addr, timeout=connect_timeout)
            else:
                self.sock = socket.create_connection(self.addr, timeout=connect_timeout)
        except OSError as e:
            raise CounterError(f"cannot connect to {addr}:{port}: {e.strerror or e}") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(timeout)

    # -- one request

    def request(self) -> int:
        """One round trip; the counter value.  CounterError on anything else
        (and the client is then broken for good)."""
        with self._lock:
            if self.error:
                raise CounterError(self.error)
            sent = time.monotonic()
            try:
                self.sock.sendall(b"\n")
                line = self._read_line()
            except CounterError as e:
                self.error = str(e)
                raise
            except OSError as e:
                self.error = _describe(e, len(self.records))
                raise CounterError(self.error) from None
            now = time.monotonic()
            self.last_line = line
            m = _REPLY_RE.match(line)
            if not m:
                self.error = f"malformed reply {line!r} after {len(self.records)} replies"
                raise CounterError(self.error)
            n = int(m.group(1))
            self.records.append((now, n, now - sent))
            return n

    def _read_line(self) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0:
                line = bytes(self._buf[: i + 1])
                del self._buf[: i + 1]
                return line
            if len(self._buf) > 64:
                raise CounterError(f"malformed reply {bytes(self._buf)!r}... (no newline) "
                                   f"after {len(self.records)} replies")  # fmt: skip
            try:
                chunk = self.sock.recv(128)
            except TimeoutError:
                raise CounterError(f"no reply within {self.timeout:g} s after {len(self.records)} replies") from None
            if not chunk:
                raise CounterError(f"the connection was closed by the server after {len(self.records)} replies")
            self._buf += chunk

    # -- at a steady rate, in the background

    def start(self, rate: float) -> None:
        """Requests at `rate` per second until stop() or the first error (no
        catching up after a slow reply: the next request goes at once)."""
        interval = 1.0 / rate
        self._thread = threading.Thread(target=self._run, args=(interval,), name="counter-client", daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        due = time.monotonic()
        while not self._stop.is_set():
            try:
                self.request()
            except CounterError:
                return
            due = max(due + interval, time.monotonic())
            self._stop.wait(max(0.0, due - time.monotonic()))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = None) -> None:
        """End the background requests (waits for the one in flight, at most
        `timeout`, default the reply timeout)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(self.timeout if timeout is None else timeout)

    def close(self) -> None:
        self._stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes a recv() in the other thread
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self.sock.close()

    def __enter__(self) -> CounterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what happened

    def values(self) -> list[int]:
        return [n for _, n, _ in list(self.records)]

    def check_sequence(self) -> list[str]:
        """Problems with the replies' values (empty: each was one more than the
        one before).  Connection errors are in `.error`, not here."""
        return check_sequence(self.values())

    @property
    def ok(self) -> bool:
        return self.error is None and not self.check_sequence()

    def longest_gap(self, since: float | None = None) -> tuple[float, float]:
        """(longest time between consecutive replies, time of the reply that
        ended it); `since` ignores replies before then."""
        times = [t for t, _, _ in list(self.records) if since is None or t >= since]
        best = (0.0, times[0] if times else 0.0)
        for a, b in zip(times, times[1:]):
            if b - a > best[0]:
                best = (b - a, b)
        return best

    def latency_p50(self, since: float | None = None) -> float | None:
        lat = [dt for t, _, dt in list(self.records) if since is None or t >= since]
        return statistics.median(lat) if lat else None


def check_sequence(values: Sequence[int]) -> list[str]:
    """Gaps, duplicates and values going backwards in a counter sequence."""
    problems = []
    for i, (a, b) in enumerate(zip(values, values[1:]), start=1):
        if b == a + 1:
            continue
        if b == a:
            problems.append(f"duplicate: reply {i + 1} repeats {a}")
        elif b < a:
            problems.append(f"went backwards: reply {i + 1} is {b} after {a}")
        else:
            problems.append(f"gap: reply {i + 1} is {b} after {a} ({b - a - 1} missing)")
    return problems


def _describe(e: OSError, replies: int) -> str:
    what = {
        errno.ECONNRESET: "the connection was reset",
        errno.EPIPE: "the connection was closed",
        errno.ETIMEDOUT: "the connection timed out",
        errno.EHOSTUNREACH: "the guest became unreachable",
    }.get(e.errno)
    return f"{what or e.strerror or e} after {replies} replies"
