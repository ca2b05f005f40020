"""Scatter lists: lists of buffers that are written, sent or split as one
stream without copying (writev, sendmsg, preadv and friends)."""

from __future__ import annotations


def split_views(views, at: int) -> tuple[list[memoryview], list[memoryview]]:
    """Split a scatter list at byte offset `at` (no copying)."""
    head, tail = [], []
    for v in views:
        v = memoryview(v).cast("B")
        if at >= len(v):
            head.append(v)
            at -= len(v)
        elif at > 0:
            head.append(v[:at])
            tail.append(v[at:])
            at = 0
        else:
            tail.append(v)
    return head, tail


def scatter(views, data) -> int:
    """Copy `data` into a scatter list, front to back; returns the bytes
    copied (what does not fit is cut, as a NIC cuts a frame too long for
    the guest's buffers)."""
    src = memoryview(data).cast("B")
    done = 0
    for v in views:
        if done == len(src):
            break
        n = min(len(v), len(src) - done)
        v[:n] = src[done : done + n]
        done += n
    return done


def consume(views: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes of a scatter list in place (after a short
    writev/sendmsg)."""
    while views and n >= len(views[0]):
        n -= len(views[0])
        views.pop(0)
    if views and n:
        views[0] = views[0][n:]
