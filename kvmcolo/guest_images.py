"""The built-in tiny guests: built from source (images/, shipped in the
package as kvmcolo.guests) with gcc and make on first use, and cached by a
hash of their sources, so no binary is ever committed or shipped.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
from importlib import resources
from pathlib import Path

from kvmcolo.errors import UserError

SOURCE_SUFFIXES = {".c", ".h", ".S", ".ld"}


def source_dir() -> Path:
    return Path(str(resources.files("kvmcolo.guests")))


def _sources(src: Path) -> list[Path]:
    files = [p for p in src.rglob("*") if p.is_file() and (p.suffix in SOURCE_SUFFIXES or p.name == "Makefile")]
    return sorted(f for f in files if "build" not in f.relative_to(src).parts)


def image_names() -> list[str]:
    """Guest workloads: the C files directly in images/ (runtime code lives in subfolders)."""
    return sorted(p.stem for p in source_dir().glob("*.c"))


def _cache_root() -> Path:
    env = os.environ.get("KVMCOLO_IMAGE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvmcolo" / "images"


def build_dir() -> Path:
    """Build every image if needed; returns the folder holding NAME.elf."""
    src = source_dir()
    digest = hashlib.sha256()
    for f in _sources(src):
        digest.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes())
    out = _cache_root() / digest.hexdigest()[:16]
    stamp = out / ".complete"
    if stamp.exists():
        return out
    for tool in ("make", "gcc"):
        if shutil.which(tool) is None:
            raise UserError(f"building the built-in guest images needs {tool}: apt-get install build-essential")
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same images
        if not stamp.exists():
            proc = subprocess.run(["make", "-s", "-C", str(src), f"BUILD={out}"], capture_output=True, text=True)
            if proc.returncode != 0:
                raise UserError(f"building the guest images failed:\n{proc.stdout}{proc.stderr}".rstrip())
            stamp.touch()
    return out


def image_path(name: str) -> Path:
    names = image_names()
    if name not in names:
        raise UserError(f"no built-in image {name!r}; available: {', '.join(names)}")
    return build_dir() / f"{name}.elf"


def symbol_address(name: str, symbol: str) -> int:
    """Guest-physical address of a global in a built-in image (the images are
    identity-mapped), e.g. the `dirty` guest's progress record `dirty_state`."""
    from elftools.elf.elffile import ELFFile

    with open(image_path(name), "rb") as f:
        symtab = ELFFile(f).get_section_by_name(".symtab")
        found = symtab.get_symbol_by_name(symbol) if symtab else None
    if not found:
        raise KeyError(f"{name}.elf has no symbol {symbol!r}")
    return found[0]["st_value"]
