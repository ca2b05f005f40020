"""A `kvmcolo` VMM as a real subprocess whose console lines a test can wait
for, and its control socket."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmcolo import control


class GuestProcess:
    """A `kvmcolo run` subprocess whose console lines can be awaited."""

    def __init__(self, argv: list[str], env: dict | None = None):
        """`env`: variables added to this process's environment."""
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     env={**os.environ, **env} if env else None)  # fmt: skip
        self.lines: list[str] = []
        self._new = queue.Queue()
        self.stderr_lines: list[str] = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines, True), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr_lines, False), daemon=True).start()

    def _pump(self, stream, into: list[str], notify: bool) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))
            if notify:
                self._new.put(None)
        if notify:
            self._new.put(None)

    def wait_line(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """The first console line at or after line `start` that matches."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        while True:
            for line in self.lines[seen:]:
                if m := rx.search(line):
                    return m
            seen = len(self.lines)
            if self.proc.poll() is not None and self._new.empty():
                raise AssertionError(f"VMM exited ({self.proc.returncode}) before {pattern!r}:\n"
                                     + "\n".join(self.lines[-20:] + self.stderr_lines[-20:]))  # fmt: skip
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}:\n" + "\n".join(self.lines[-20:]))
            try:
                self._new.get(timeout=min(left, 0.5))
            except queue.Empty:
                pass

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def call(self, command: str, **arguments):
        """A control-socket command (the VMM must have been started with --control)."""
        return control.call(self.control_path, command, arguments)

    @property
    def control_path(self) -> str:
        argv = self.proc.args
        return argv[argv.index("--control") + 1]

    def all_lines(self) -> list[str]:
        """Console and stderr lines."""
        return self.lines + self.stderr_lines

    def new_lines_from(self, index: int) -> list[str]:
        return self.lines[index:]


def kvmcolo_exe() -> str:
    return str(Path(sys.executable).parent / "kvmcolo")
