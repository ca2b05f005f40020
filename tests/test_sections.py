"""The state container format: round trip and every way a stream is refused."""

from __future__ import annotations

import pytest

from kvmcolo import sections

KNOWN = {b"AAAA": 1, b"BBBB": 2}


def stream(secs) -> bytes:
    return b"".join(bytes(p) for p in sections.encode(secs))


def test_round_trip_is_zero_copy():
    data = stream([sections.Section(b"AAAA", 1, b"hello"), sections.Section(b"BBBB", 2, b"x" * 10000)])
    out = sections.decode(data, KNOWN)
    assert [(s.tag, s.version, bytes(s.payload)) for s in out] == [(b"AAAA", 1, b"hello"), (b"BBBB", 2, b"x" * 10000)]
    assert isinstance(out[0].payload, memoryview)


@pytest.mark.parametrize("secs,words", [
    ([sections.Section(b"CCCC", 1, b"")], "unknown section 'CCCC'"),
    ([sections.Section(b"AAAA", 2, b"")], "version 2 is newer"),
])  # fmt: skip
def test_unknown_sections_and_versions(secs, words):
    with pytest.raises(sections.StateFormatError, match=words):
        sections.decode(stream(secs), KNOWN)


def test_every_truncation_is_detected():
    data = stream([sections.Section(b"AAAA", 1, b"payload" * 20)])
    for cut in range(len(data)):
        with pytest.raises(sections.StateFormatError):
            sections.decode(data[:cut], KNOWN)


def test_end_tag_cannot_be_forged_as_a_section():
    with pytest.raises(ValueError):
        sections.encode([sections.Section(sections.END, 1, b"")])
