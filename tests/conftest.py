"""Shared test fixtures.

The rule of the house: when CI=true, a test whose real dependency (/dev/kvm,
/dev/net/tun, /dev/fuse, network namespaces) is missing FAILS; it may only be
skipped on a developer's machine without it.  `require_device` is the one
place that decides.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmcolo.console_buffer import ConsoleBuffer

REPO = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The full-distribution Linux test is opt-in (KVMCOLO_FULL_LINUX=1): it
# downloads Debian's cloud kernel and needs a host that runs guest userspace.
# Not asked for, it is not collected at all (rather than skipped).
collect_ignore = [] if os.environ.get("KVMCOLO_FULL_LINUX") == "1" else ["test_linux_full.py"]


def unavailable(message: str) -> None:
    """A real dependency is missing: fail in CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(message + " -- CI must run the real thing, not skip it")
    pytest.skip(message)


def require_device(path: str, what: str) -> None:
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError as e:
        unavailable(f"{what} is not usable here ({path}: {e.strerror})")
    os.close(fd)


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        unavailable(f"{what} need root")


@pytest.fixture(scope="session")
def kvm_device():
    require_device("/dev/kvm", "KVM")
    return "/dev/kvm"


@pytest.fixture(scope="session")
def images(kvm_device) -> Path:
    """Folder with the built tiny guests (NAME.elf)."""
    from kvmcolo import guest_images

    return guest_images.build_dir()


ConsoleSink = ConsoleBuffer  # the tests' name for it


def wait_until(condition, what: str, timeout: float = 20, poll: float = 0.02):
    """Poll `condition()` until it returns something true (returned), or fail
    saying what did not happen: tests wait on conditions, never on time."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s")


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
