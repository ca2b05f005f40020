"""The longer fuzz campaign (issue 12): every target of tests/fuzz_targets.py
under atheris (coverage-guided) for SECONDS each, then a table of inputs,
inputs per second and crashes.  A crash's report and input are kept in the
work folder.

    .venv/bin/python benchmarks/fuzz.py [SECONDS] [TARGET...]
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import fuzz_targets  # noqa: E402
from kvmcolo.guest_images import image_path  # noqa: E402


def main() -> int:
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    names = sys.argv[2:] or sorted(fuzz_targets.TARGETS)
    workdir = tempfile.mkdtemp(prefix="kvmcolo-fuzz-")
    elf = str(image_path("hello"))  # the kernel_loader's seed (built with gcc on first use)
    print(f"fuzzing {len(names)} targets for {seconds} s each (atheris); work folder {workdir}")
    print(f"{'target':<26}{'inputs':>12}{'inputs/s':>10}  crash")
    crashes = 0
    for name in names:
        r = fuzz_targets.atheris_campaign(name, seconds, workdir, elf)
        first = r["crash"].strip().splitlines()[1] if r["crash"] else "none"
        crashes += r["crash"] is not None
        print(f"{name:<26}{r['inputs']:>12,}{r['per_second']:>10,}  {first}", flush=True)
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main())
