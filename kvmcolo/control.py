"""Layer 5: the control socket — a running VMM's QMP-like interface.

Newline-delimited JSON over a Unix socket that only its owner can use
(mode 0600 in a 0700 folder).  On connect the server greets with
{"kvmcolo": {"version": V, "pid": P}}; then every request line
{"execute": NAME, "arguments": {...}, "id": X} gets one reply line,
{"return": ...} or {"error": {"class": C, "desc": D}} (with "id" echoed).
A malformed line or an unknown command gets an error reply; the VMM is not
affected.  Commands are plain callables registered by name, run one at a
time on the server's thread.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import stat
import threading
import time
from typing import Callable

from kvmcolo import __version__, jsonsafe
from kvmcolo.errors import UserError
from kvmcolo.refusals import RefusalLog

log = logging.getLogger(__name__)

DEFAULT_DIR = "/run/kvmcolo"
MAX_LINE = 1 << 20
MAX_CLIENTS = 64  # beyond this, the longest-idle client is disconnected
ACCEPT_PAUSE_S = 0.2  # after accept() fails (EMFILE): how long the socket is not watched
MAX_SOCKET_PATH = 108  # sun_path, with its terminating NUL


def default_path() -> str:
    return os.path.join(DEFAULT_DIR, f"kvmcolo-{os.getpid()}.sock")


class CommandError(Exception):
    """A command refused its arguments or could not run; sent as an error reply."""


class ControlServer:
    def __init__(self, path: str, commands: dict[str, Callable[..., object]]):
        self.path = path
        self.commands = commands
        folder = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create control socket folder {folder!r}: {e.strerror}")
        if len(os.fsencode(path)) >= MAX_SOCKET_PATH:
            raise UserError(f"control socket path is {len(os.fsencode(path))} bytes; a Unix socket path must be "
                            f"shorter than {MAX_SOCKET_PATH}")  # fmt: skip
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            # Only ever remove a socket: a file, folder or device given here by
            # mistake is refused and left exactly as it was.
            if not stat.S_ISSOCK(st.st_mode):
                raise UserError(f"{path!r} exists and is not a socket; give --control a new path")
            if _alive(path):
                raise UserError(f"control socket {path!r} is in use by a running VMM")
            os.unlink(path)  # a stale socket left by a killed VMM
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self._sock.bind(path)
        except OSError as e:
            self._sock.close()
            raise UserError(f"cannot create control socket {path!r}: {e.strerror}")
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._sock.listen(socket.SOMAXCONN)
        self._sock.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._sock, selectors.EVENT_READ, None)
        self._stop_r, self._stop_w = os.pipe()
        self._selector.register(self._stop_r, selectors.EVENT_READ, "stop")
        self._buffers: dict[socket.socket, bytearray] = {}
        self._out: dict[socket.socket, bytearray] = {}
        self._last_active: dict[socket.socket, float] = {}
        self._refusals = RefusalLog(log, "control socket")
        self._accept_paused_until: float | None = None
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)
        for conn in list(self._buffers):
            conn.close()
        self._sock.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # ---- serving ------------------------------------------------------------
    #
    # One thread, non-blocking sockets.  Each client has an input buffer
    # (partial lines) and an output buffer (replies the kernel would not take
    # yet).  A client whose replies are waiting is not read from until it
    # has taken them, so one that sends but never reads stalls only itself,
    # and its buffers stay bounded; everyone else is served as before.

    def _run(self) -> None:
        while True:
            timeout = None
            if self._accept_paused_until is not None:
                timeout = max(0.0, self._accept_paused_until - time.monotonic())
                if timeout == 0.0:
                    self._accept_paused_until = None
                    self._selector.register(self._sock, selectors.EVENT_READ, None)
                    timeout = None
            for key, mask in self._selector.select(timeout):
                if key.data == "stop":
                    return
                if key.data is None:
                    self._accept()
                elif mask & selectors.EVENT_WRITE:
                    self._writable(key.fileobj)
                else:
                    self._read(key.fileobj)

    def _accept(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except BlockingIOError:
            return
        except OSError as e:
            # Out of file descriptors (EMFILE/ENFILE) or memory.  The client
            # idle longest gives its descriptor back (the next select retries);
            # with none to give, stop watching the socket for a moment rather
            # than spin on it.  Logged at most once per window, with a count.
            if self._last_active:
                self._refusals.refused("a connection", f"cannot accept it ({e.strerror or e}); disconnecting "
                                       f"the longest-idle of {len(self._buffers)} clients")  # fmt: skip
                self._drop(min(self._last_active, key=self._last_active.get))
                return
            self._refusals.refused("a connection", f"cannot accept it ({e.strerror or e}); retrying in "
                                   f"{ACCEPT_PAUSE_S:.1f} s")  # fmt: skip
            self._selector.unregister(self._sock)
            self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
            return
        if len(self._buffers) >= MAX_CLIENTS:
            # Full: the client idle longest makes room, so the operator always gets in.
            self._drop(min(self._last_active, key=self._last_active.get))
        conn.setblocking(False)
        self._buffers[conn] = bytearray()
        self._out[conn] = bytearray()
        self._last_active[conn] = time.monotonic()
        self._selector.register(conn, selectors.EVENT_READ, "conn")
        self._send(conn, {"kvmcolo": {"version": __version__, "pid": os.getpid()}})

    def _drop(self, conn: socket.socket) -> None:
        if conn not in self._buffers:
            return  # already dropped (evicted earlier in the same round of events)
        self._selector.unregister(conn)
        self._buffers.pop(conn, None)
        self._out.pop(conn, None)
        self._last_active.pop(conn, None)
        conn.close()

    def _read(self, conn: socket.socket) -> None:
        if conn not in self._buffers:
            return  # evicted earlier in the same round of events
        try:
            data = conn.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        self._last_active[conn] = time.monotonic()
        self._buffers[conn] += data
        self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        """Answer the complete lines buffered for `conn`, until its replies back up."""
        buf = self._buffers[conn]
        while not self._out[conn] and (nl := buf.find(b"\n")) >= 0:
            line = bytes(buf[:nl])
            del buf[: nl + 1]
            if line.strip():
                reply, quit_after = self.handle_line(line)
                if not self._send(conn, reply):
                    return
                if quit_after:
                    quit_after()
                    return
        if len(buf) > MAX_LINE and buf.find(b"\n") < 0:
            self._send(conn, _error("InvalidRequest", "request line too long"))
            self._drop(conn)

    def _send(self, conn: socket.socket, obj: dict) -> bool:
        """Queue a reply and send what the socket takes now; False if the client is gone."""
        self._out[conn] += json.dumps(obj).encode() + b"\n"
        return self._flush(conn)

    def _flush(self, conn: socket.socket) -> bool:
        out = self._out[conn]
        try:
            while out:
                del out[: conn.send(out)]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(conn)
            return False
        # Waiting replies: watch for room to write instead of for requests.
        self._selector.modify(conn, selectors.EVENT_WRITE if out else selectors.EVENT_READ, "conn")
        return True

    def _writable(self, conn: socket.socket) -> None:
        if conn in self._out and self._flush(conn) and not self._out[conn]:
            self._answer(conn)  # lines that arrived while its replies waited

    def handle_line(self, line: bytes) -> tuple[dict, Callable[[], None] | None]:
        """One request line to one reply (and, for quit, what to do after replying)."""
        try:
            req = jsonsafe.loads(line)
        except ValueError as e:
            return _error("InvalidJSON", str(e)), None
        if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
            return _error("InvalidRequest", 'expected {"execute": "<command>", "arguments": {...}}'), None
        name = req["execute"]
        args = req.get("arguments", {})
        reply_id = {"id": req["id"]} if "id" in req else {}
        if not isinstance(args, dict):
            return {**_error("InvalidRequest", "arguments must be an object"), **reply_id}, None
        command = self.commands.get(name)
        if command is None:
            known = ", ".join(sorted(self.commands))
            return {**_error("CommandNotFound", f"unknown command {name!r}; known: {known}"), **reply_id}, None
        try:
            result = command(**args)
        except TypeError as e:
            return {**_error("InvalidArguments", f"{name}: {e}"), **reply_id}, None
        except (CommandError, UserError) as e:
            return {**_error("GenericError", str(e)), **reply_id}, None
        except Exception as e:  # noqa: BLE001 - the VMM stays up; the client hears what went wrong
            log.exception("control command %s failed", name)
            return {**_error("InternalError", f"{name} failed: {e}"), **reply_id}, None
        after = None
        if isinstance(result, QuitAfterReply):
            after, result = result.action, result.value
        return {"return": result, **reply_id}, after


class QuitAfterReply:
    """A command result whose action runs once the reply has been sent."""

    def __init__(self, value, action: Callable[[], None]):
        self.value = value
        self.action = action


def _error(cls: str, desc: str) -> dict:
    return {"error": {"class": cls, "desc": desc}}


def _alive(path: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


# ---- client -------------------------------------------------------------------


def find_socket(path: str | None) -> str:
    """The socket to talk to: the one given, or the only one in DEFAULT_DIR."""
    if path:
        return path
    try:
        found = sorted(f for f in os.listdir(DEFAULT_DIR) if f.endswith(".sock"))
    except FileNotFoundError:
        found = []
    live = [os.path.join(DEFAULT_DIR, f) for f in found if _alive(os.path.join(DEFAULT_DIR, f))]
    if not live:
        raise UserError(f"no running kvmcolo VMM found in {DEFAULT_DIR}; give --control PATH")
    if len(live) > 1:
        raise UserError(f"{len(live)} VMMs are running; choose one with --control ({', '.join(live)})")
    return live[0]


def call(socket_path: str, command: str, arguments: dict | None = None, timeout: float = 120) -> object:
    """Send one command and return its result; UserError on any failure."""
    path = socket_path
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                s.connect(path)
                break
            except BlockingIOError:  # the VMM's backlog is full for a moment: it is busy accepting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
    except FileNotFoundError:
        s.close()
        raise UserError(f"no control socket at {path!r}")
    except OSError as e:
        s.close()
        raise UserError(f"cannot connect to {path!r}: {e.strerror}")
    try:
        with s, s.makefile("rwb") as f:
            greeting = f.readline(MAX_LINE)  # a kvmcolo VMM greets first
            f.write(json.dumps({"execute": command, "arguments": arguments or {}}).encode() + b"\n")
            f.flush()
            line = f.readline(MAX_LINE)
    except OSError as e:
        raise UserError(f"{path!r} is not answering as a kvmcolo VMM: {e.strerror or e}")
    if not line:
        raise UserError(f"the VMM at {path!r} closed the connection")
    try:
        reply = jsonsafe.loads(line)
        jsonsafe.loads(greeting)
    except ValueError:
        raise UserError(f"{path!r} is not a kvmcolo control socket (it answered something else)")
    if not isinstance(reply, dict) or not ("return" in reply or "error" in reply):
        raise UserError(f"{path!r} is not a kvmcolo control socket (it answered something else)")
    if "error" in reply:
        error = reply["error"]
        raise UserError(f"{command}: {error.get('desc') if isinstance(error, dict) else error}")
    return reply["return"]
