"""Facts about other processes (standard library only: cheap to import)."""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists.  Leftovers (mounts, namespaces, folders)
    carry their creator's pid; only a dead creator's are stale."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
