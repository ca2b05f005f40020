"""virtio-blk end to end: the `disk` guest's records on a real image file,
checked by a host-side reader; read-only disks; a misbehaving driver."""

from __future__ import annotations

import re

import pytest

from conftest import kvmcolo_cmd
from disk_records import read_records


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
    return p


def run_disk(image, *guest_args, disk_opts=""):
    return kvmcolo_cmd("run", "--image", "disk", "--disk", f"{image}{disk_opts}", "--", *guest_args, timeout=120)


def test_records_reach_the_image_and_survive_a_second_boot(images, image):
    first = run_disk(image, "records=40", "report=10")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "disk: found=0" in first.stdout and "disk: done found=0 written=40 total=40" in first.stdout
    assert read_records(image) == 40  # the host reader agrees, byte for byte

    second = run_disk(image, "records=25")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "disk: found=40" in second.stdout and "total=65" in second.stdout
    assert read_records(image) == 65


def test_guest_detects_a_corrupted_record(images, image):
    assert run_disk(image, "records=8").returncode == 0
    with open(image, "r+b") as f:
        f.seek(3 * 4096 + 100)
        f.write(b"\xff")
    proc = run_disk(image, "records=1")
    assert proc.returncode == 1
    assert "disk: CORRUPT record=3" in proc.stdout


def test_read_only_disk_refuses_writes(images, image):
    assert run_disk(image, "records=5").returncode == 0
    before = image.read_bytes()
    proc = run_disk(image, "expect_ro=1", disk_opts=",ro")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "disk: found=5" in proc.stdout and "disk: read-only ok" in proc.stdout
    assert image.read_bytes() == before


def test_bad_disk_images_are_user_errors(images, tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    for disk, words in ((odd, "multiple of 512"), (tmp_path / "none.img", "does not exist")):
        proc = kvmcolo_cmd("run", "--image", "disk", "--disk", str(disk), timeout=60)
        assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    proc = kvmcolo_cmd("run", "--image", "disk", "--disk", f"{odd},bogus", timeout=60)
    assert proc.returncode == 2 and "unknown option" in proc.stderr


@pytest.mark.parametrize("mode,needs_reset", [("oob", 1), ("loop", 1), ("badnext", 1), ("hugelen", 1),
                                              ("qsize", 1), ("early", 0), ("none", 0)])  # fmt: skip
def test_misbehaving_driver_cannot_hurt_the_vmm(images, tmp_path, mode, needs_reset):
    victim, witness = tmp_path / "victim.img", tmp_path / "witness.img"
    for p in (victim, witness):
        with open(p, "wb") as f:
            f.truncate(1 << 20)
    proc = kvmcolo_cmd("run", "--image", "badvirtio", "--disk", str(victim), "--disk", str(witness),
                       "--", f"mode={mode}", timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"badvirtio: mode=(\w+) status=0x([0-9a-f]+) needs_reset=(\d)", proc.stdout)
    assert m and m.group(1) == mode and int(m.group(3)) == needs_reset, proc.stdout
    assert "badvirtio: witness ok" in proc.stdout  # the other device kept working
    logged = [line for line in proc.stderr.splitlines() if "needs reset" in line or "before DRIVER_OK" in line]
    assert len(logged) == (1 if mode != "none" else 0), proc.stderr  # one line says what happened
    assert "Traceback" not in proc.stderr
