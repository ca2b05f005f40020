"""Host-side reader of the `disk` guest's records (format: images/disk.c).

Record i is bytes [i*4096, (i+1)*4096), little-endian u64 words:
magic "KVMCREC1", seq = i, payload seed, 508 payload words (a splitmix-style
mix of seed, seq and word index), and a 64-bit FNV-1a of bytes [0, 4088).
"""

from __future__ import annotations

import struct

RECORD = 4096
MAGIC = int.from_bytes(b"KVMCREC1", "little")
M64 = (1 << 64) - 1


def payload_word(seed: int, seq: int, k: int) -> int:
    z = (seed * 0x9E3779B97F4A7C15 + seq * 0xBF58476D1CE4E5B9 + (k + 1) * 0x94D049BB133111EB) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def check_record(raw: bytes, index: int) -> str | None:
    """None if `raw` is a valid record number `index`, else what is wrong."""
    magic, seq, seed = struct.unpack_from("<QQQ", raw)
    if magic != MAGIC:
        return "bad magic"
    if seq != index:
        return f"seq {seq} in slot {index}"
    words = struct.unpack_from("<508Q", raw, 24)
    if any(w != payload_word(seed, seq, k) for k, w in enumerate(words)):
        return "payload mismatch"
    if struct.unpack_from("<Q", raw, 4088)[0] != fnv1a64(raw[:4088]):
        return "checksum mismatch"
    return None


def read_records(path) -> int:
    """Number of valid records from the start of the image; raises
    AssertionError on a corrupt record or a record after a gap."""
    data = open(path, "rb").read()
    count = 0
    while (count + 1) * RECORD <= len(data):
        raw = data[count * RECORD : (count + 1) * RECORD]
        if not any(raw):
            break
        problem = check_record(raw, count)
        assert problem is None, f"record {count}: {problem}"
        count += 1
    for later in range(count + 1, min(count + 5, len(data) // RECORD)):
        assert not any(data[later * RECORD : (later + 1) * RECORD]), f"record {later} after a gap at {count}"
    return count
