"""Layer 2: which boot protocol a --kernel file speaks, and booting it.

Two formats, told apart by their bytes, never by the file name:
- an ELF with a PVH entry note (a Linux vmlinux built with CONFIG_PVH, or
  one of our tiny guests): boot.py;
- a bzImage (a distribution's vmlinuz) with a 64-bit entry: bzimage.py.
Either gets the same command line, initrd, ACPI tables and MP table.
"""

from __future__ import annotations

from kvmcolo import acpi, boot, bzimage
from kvmcolo.errors import UserError
from kvmcolo.files import open_input
from kvmcolo.memory import GuestMemory

Kernel = boot.PvhImage | bzimage.BzImage
_ELF_MAGIC = b"\x7fELF"
_SNIFF = 0x400  # enough for the ELF magic and the bzImage setup header


def read_kernel(path: str) -> Kernel:
    """Read a kernel in whichever format it is; UserError if neither."""
    with open_input(path, "kernel") as f:
        try:
            head = f.read(_SNIFF)
            if bzimage.is_bzimage(head):
                return bzimage.read_bzimage(path, head + f.read())
        except OSError as e:
            raise UserError(f"cannot read kernel {path!r}: {e.strerror}")
    if head.startswith(_ELF_MAGIC):
        return boot.read_pvh_image(path)
    raise UserError(f"kernel {path!r} is neither an ELF with a PVH entry note nor a bzImage")


def describe(image: Kernel) -> str:
    if isinstance(image, bzimage.BzImage):
        return f"bzImage, boot protocol {image.protocol}, 64-bit entry at {image.entry:#x}"
    return f"PVH ELF, entry at {image.entry:#x}"


def load_and_start(
    image: Kernel,
    mem: GuestMemory,
    boot_vcpu,
    cmdline: str,
    ncpus: int,
    initrd: tuple[str, bytes] | None,
    virtio: list[acpi.MmioDevice],
) -> None:
    """Put the kernel, its boot data and the initrd in RAM and the boot vCPU at its entry."""
    if isinstance(image, bzimage.BzImage):
        zero_page = bzimage.load_bzimage(mem, image, cmdline, ncpus, initrd[1] if initrd else None, virtio)
        bzimage.boot_cpu_state(boot_vcpu, image.entry, zero_page)
    else:
        modules = [(initrd[0], initrd[1], "")] if initrd else []
        start_info = boot.load_pvh(mem, image, cmdline, ncpus, modules, virtio)
        boot.pvh_boot_cpu_state(boot_vcpu, image.entry, start_info)
