"""The house rule itself: in CI a missing device fails the test; elsewhere it skips."""

from __future__ import annotations

import pytest

import conftest


def test_missing_device_fails_in_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", True)
    with pytest.raises(pytest.fail.Exception, match="CI must run the real thing"):
        conftest.require_device("/dev/no-such-device", "a device")


def test_missing_device_skips_outside_ci(monkeypatch):
    monkeypatch.setattr(conftest, "IN_CI", False)
    with pytest.raises(pytest.skip.Exception):
        conftest.require_device("/dev/no-such-device", "a device")
