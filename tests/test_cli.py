"""Every mistake a user can make: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import kvmcolo_cmd
from elf_util import make_elf


def assert_user_error(proc, *fragments: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for frag in fragments:
        assert frag in lines[0], proc.stderr


@pytest.fixture
def elf_without_pvh_note(tmp_path):
    p = tmp_path / "plain.elf"
    p.write_bytes(make_elf([(0x100000, b"\xf4" * 16, 16)]))
    return str(p)


@pytest.fixture
def huge_elf(tmp_path):
    p = tmp_path / "huge.elf"
    p.write_bytes(make_elf([(0x100000, b"\xf4" * 16, 64 << 20)], pvh_entry=0x100000))
    return str(p)


def test_missing_kernel(tmp_path):
    assert_user_error(kvmcolo_cmd("run", "--kernel", str(tmp_path / "nope")), "does not exist")


@pytest.mark.parametrize("what, message", [("missing", "does not exist"), ("folder", "is a directory"),
                                           ("fifo", "is not a regular file")])  # fmt: skip
def test_initrd_that_is_not_a_file(tmp_path, images, what, message):
    from kvmcolo.guest_images import image_path

    initrd = tmp_path / what
    if what == "folder":
        initrd.mkdir()
    elif what == "fifo":
        os.mkfifo(initrd)
    proc = kvmcolo_cmd("run", "--kernel", str(image_path("hello")), "--initrd", str(initrd))
    assert_user_error(proc, "initrd", message)


def test_kernel_neither_elf_nor_bzimage(tmp_path):
    p = tmp_path / "text"
    p.write_text("not an elf at all\n" * 10)
    assert_user_error(kvmcolo_cmd("run", "--kernel", str(p)), "neither an ELF with a PVH entry note nor a bzImage")


def test_kernel_without_pvh_note(elf_without_pvh_note):
    assert_user_error(kvmcolo_cmd("run", "--kernel", elf_without_pvh_note), "not a PVH kernel")


def test_host_binary_is_not_a_pvh_kernel():
    assert_user_error(kvmcolo_cmd("run", "--kernel", "/bin/true"), "not a PVH kernel")


def test_image_larger_than_ram(kvm_device, huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--mem", "32M"), "does not fit in 32 MiB")


@pytest.mark.parametrize("size", ["abc", "12Q", "-5", "1.5G"])
def test_bad_size(huge_elf, size):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--mem", size), "bad size")


def test_size_too_small(huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--mem", "1M"), "at least 2 MiB")


def test_size_larger_than_host(kvm_device, huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--mem", "64T"), "more than this host")


@pytest.mark.parametrize("cpus", ["0", "-1"])
def test_too_few_vcpus(huge_elf, cpus):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--cpus", cpus), "--cpus must be")


def test_too_many_vcpus(kvm_device, huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--mem", "128M", "--cpus", "100000"), "--cpus must be between 1 and")


def test_not_a_number_of_vcpus(huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--cpus", "two"), "invalid int value")


def test_no_kvm_device(huge_elf, tmp_path):
    proc = kvmcolo_cmd("run", "--kernel", huge_elf, env={"KVMCOLO_KVM_DEVICE": str(tmp_path / "kvm")})
    assert_user_error(proc, "does not exist", "no KVM")


def test_no_permission_on_kvm(kvm_device, huge_elf, tmp_path):
    """A KVM device node the user may not open.  We run as root, so the node
    gets mode 000 and the VMM runs without CAP_DAC_OVERRIDE."""
    node = tmp_path / "kvm"
    os.mknod(node, 0o000 | stat.S_IFCHR, os.stat("/dev/kvm").st_rdev)
    os.chmod(node, 0)
    proc = kvmcolo_cmd("run", "--kernel", huge_elf, env={"KVMCOLO_KVM_DEVICE": str(node)},
                       prefix=["setpriv", "--bounding-set=-dac_override,-dac_read_search"])  # fmt: skip
    assert_user_error(proc, "no permission to open", "run as root")


def test_unknown_image():
    assert_user_error(kvmcolo_cmd("run", "--image", "no-such-guest"), "no built-in image 'no-such-guest'", "hello")


def test_kernel_and_image_together(huge_elf):
    assert_user_error(kvmcolo_cmd("run", "--kernel", huge_elf, "--image", "hello"), "not allowed with")


def test_unknown_option():
    assert_user_error(kvmcolo_cmd("run", "--image", "hello", "--bogus"), "unrecognized arguments")


def test_help_explains_run():
    proc = kvmcolo_cmd("run", "--help")
    assert proc.returncode == 0
    for word in ("--kernel", "--image", "--mem", "--cpus", "--cmdline", "Examples"):
        assert word in proc.stdout


def test_bridge_that_does_not_exist(kvm_device):
    assert_user_error(kvmcolo_cmd("run", "--image", "hello", "--net", "tap=kvmcolotest9,bridge=nosuchbr0"),
                      "bridge 'nosuchbr0' does not exist")  # fmt: skip


def test_unknown_net_option():
    assert_user_error(kvmcolo_cmd("run", "--image", "hello", "--net", "tap,colour=blue"), "unknown option", "bridge=BR")


@pytest.mark.parametrize("option,value", [("--compare-timeout", "0"), ("--max-queue", "-1")])
def test_nonpositive_compare_limits(tmp_path, option, value):
    key = tmp_path / "key"
    key.write_text("x" * 32)
    assert_user_error(kvmcolo_cmd("boot", "--secondary", "--listen", "127.0.0.1:7777", "--key-file", str(key),
                                  option, value), "is outside")  # fmt: skip
