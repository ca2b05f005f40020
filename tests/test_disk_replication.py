"""Pending primary writes and the journaled apply: every way an apply can be
cut short leaves the base either untouched or fully applied."""

from __future__ import annotations

import os
import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from kvmcolo.disk_replication import (PendingWrites, apply_writes, chunk_hashes, journal_path, read_journal,
                                      recover)  # fmt: skip

SIZE = 1 << 16


def base_file(tmp_path, fill: bytes = b"\x00"):
    p = tmp_path / "base.img"
    p.write_bytes(fill * SIZE)
    return str(p)


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(st.tuples(st.integers(0, SIZE - 1), st.binary(min_size=1, max_size=3000)), max_size=20),
       limit=st.sampled_from([0, 100, 1 << 20]))  # fmt: skip
def test_pending_writes_apply_in_order_like_a_model(tmp_path_factory, writes, limit):
    tmp = tmp_path_factory.mktemp("pw")
    base = base_file(tmp)
    model = bytearray(SIZE)
    pending = PendingWrites(str(tmp), memory_limit=limit)  # limit 0: everything spills to the scratch file
    for offset, data in writes:
        data = data[: SIZE - offset]
        pending.add(offset, data)
        model[offset : offset + len(data)] = data
    apply_writes(base, pending)
    assert open(base, "rb").read() == bytes(model)
    assert not os.path.exists(journal_path(base))
    pending.clear()
    assert len(pending) == 0 and pending.bytes == 0


def crash_after_journal(base: str, writes: list[tuple[int, bytes]]) -> int:
    """Apply in a child process that dies (os._exit) right after the journal is durable."""
    code = (
        "import os, sys\n"
        "from kvmcolo.disk_replication import PendingWrites, apply_writes\n"
        f"p = PendingWrites()\n"
        f"for off, data in {writes!r}: p.add(off, data)\n"
        f"apply_writes({base!r}, p, crash_hook=lambda: os._exit(70))\n"
    )
    return subprocess.run([sys.executable, "-c", code]).returncode


def test_killed_during_apply_is_replayed_at_restart(tmp_path):
    base = base_file(tmp_path)
    writes = [(0, b"A" * 5000), (4096, b"B" * 100), (60000, b"C" * 5536)]
    assert crash_after_journal(base, writes) == 70
    assert open(base, "rb").read() == bytes(SIZE)  # nothing applied yet
    assert read_journal(journal_path(base)) is not None
    assert recover(base) == "replayed"
    expected = bytearray(SIZE)
    for off, data in writes:
        expected[off : off + len(data)] = data
    assert open(base, "rb").read() == bytes(expected)
    assert not os.path.exists(journal_path(base))
    assert recover(base) is None  # nothing left to do


def test_torn_journal_is_rolled_back(tmp_path):
    base = base_file(tmp_path, b"\x11")
    assert crash_after_journal(base, [(0, b"X" * 9000)]) == 70
    jp = journal_path(base)
    raw = open(jp, "rb").read()
    open(jp, "wb").write(raw[:-5])  # the trailer never made it to disk
    assert recover(base) == "rolled back"
    assert open(base, "rb").read() == b"\x11" * SIZE  # untouched
    assert not os.path.exists(jp)


def test_a_journal_with_a_flipped_byte_is_not_replayed(tmp_path):
    base = base_file(tmp_path)
    crash_after_journal(base, [(0, b"Y" * 4096)])
    jp = journal_path(base)
    raw = bytearray(open(jp, "rb").read())
    raw[100] ^= 1
    open(jp, "wb").write(raw)
    assert recover(base) == "rolled back"
    assert open(base, "rb").read() == bytes(SIZE)


def test_chunk_hashes_find_differing_chunks(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(3 << 20))
    b.write_bytes(bytes(1 << 20) + b"\x01" + bytes((2 << 20) - 1))
    ha, hb = chunk_hashes(str(a)), chunk_hashes(str(b))
    assert len(ha) == 3 and [i for i in range(3) if ha[i] != hb[i]] == [1]


def test_a_checkpoint_takes_only_the_writes_its_capture_saw(tmp_path):
    """Writes the resumed primary made after a capture can arrive before that
    checkpoint's frames; their epoch keeps them for the next checkpoint."""
    base = base_file(tmp_path)
    pending = PendingWrites(str(tmp_path), memory_limit=10)  # most of it spills
    pending.add(0, b"a" * 100, epoch=1)
    pending.add(100, b"b" * 100, epoch=1)
    pending.add(200, b"c" * 100, epoch=2)  # made after capture 1
    assert apply_writes(base, pending.before(2)) == 200
    pending.drop_before(2)
    data = open(base, "rb").read()
    assert data[:200] == b"a" * 100 + b"b" * 100 and data[200:300] == bytes(100)
    assert [o for o, _ in pending] == [200] and pending.bytes == 100
    apply_writes(base, pending.before(3))
    assert open(base, "rb").read()[200:300] == b"c" * 100
    import pytest

    with pytest.raises(ValueError):
        pending.add(0, b"x", epoch=1)  # epochs never go back
