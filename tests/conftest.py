"""Shared test fixtures.

The rule of the house: when CI=true, a test whose real dependency (/dev/kvm,
/dev/net/tun, /dev/fuse, network namespaces) is missing FAILS; it may only be
skipped on a developer's machine without it.  `require_device` is the one
place that decides.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_device(path: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        message = f"{what} is not usable here ({path}: {e.strerror})"
        if IN_CI:
            pytest.fail(message + " -- CI must run the real thing, not skip it")
        pytest.skip(message)
    os.close(fd)


@pytest.fixture(scope="session")
def kvm_device():
    require_device("/dev/kvm", "KVM")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def images(kvm_device) -> Path:
    """Folder with the built tiny guests (NAME.elf)."""
    from kvmcolo import guest_images

    return guest_images.build_dir()


class ConsoleSink:
    """A binary stream for the guest's serial output that tests can wait on."""

    def __init__(self, echo: bool = False):
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._echo = echo

    def write(self, data: bytes) -> int:
        with self._cond:
            self._buf += data
            self._cond.notify_all()
        if self._echo:
            sys.stderr.buffer.write(data)
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace")

    def lines(self) -> list[str]:
        return self.text.splitlines()

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match:
        """Wait until `pattern` (a regex) appears at or after character `start`."""
        rx = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf.decode(errors="replace"), start)
                if m:
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {pattern!r}; console so far:\n{self.text[-3000:]}")
                self._cond.wait(min(left, 0.5))


@pytest.fixture
def console():
    return ConsoleSink()


def kvmcolo_cmd(*args: str, env: dict | None = None, timeout: float = 120, prefix: list[str] = (),
                **kw) -> subprocess.CompletedProcess:
    """Run the installed `kvmcolo` console script (the venv's, next to this Python)."""
    exe = Path(sys.executable).parent / "kvmcolo"
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    return subprocess.run([*prefix, str(exe), *args], capture_output=True, text=True, timeout=timeout, env=full_env, **kw)
