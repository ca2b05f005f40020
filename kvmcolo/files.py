"""Opening files a user names, safely: a FIFO never blocks the VMM, and
anything but a regular file is a clear refusal, not a hang or a surprise."""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

from kvmcolo.errors import UserError


def open_regular(path: str, what: str) -> BinaryIO:
    """`path` opened for reading.  FileNotFoundError and other OSErrors pass
    through (IsADirectoryError for a folder); a FIFO, socket or device is a
    UserError naming `what` (e.g. "kernel")."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO opens at once
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise UserError(f"{what} {path!r} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_input(path: str, what: str) -> BinaryIO:
    """open_regular, with every failure a UserError naming `what` and `path`."""
    try:
        return open_regular(path, what)
    except FileNotFoundError:
        raise UserError(f"{what} {path!r} does not exist")
    except IsADirectoryError:
        raise UserError(f"{what} {path!r} is a directory, not a file")
    except OSError as e:
        raise UserError(f"cannot read {what} {path!r}: {e.strerror}")


def read_input(path: str, what: str) -> bytes:
    """The whole of a file a user named; every failure a UserError."""
    with open_input(path, what) as f:
        try:
            return f.read()
        except OSError as e:
            raise UserError(f"cannot read {what} {path!r}: {e.strerror}")
