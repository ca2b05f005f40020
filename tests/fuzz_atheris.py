"""Run one fuzz target under atheris (coverage-guided, libFuzzer).

    python tests/fuzz_atheris.py TARGET CORPUS_DIR [libFuzzer options...]

CORPUS_DIR is seeded from fuzz_targets.seeds() (and KVMCOLO_FUZZ_ELF, a
real PVH image, for kernel_loader).  An input that makes the target raise
anything but its typed refusal is a crash: libFuzzer writes it out (see
-artifact_prefix) and the exit status is non-zero.  Used by test_fuzz.py
(bounded) and benchmarks/fuzz.py (longer, with throughput).
"""

from __future__ import annotations

import hashlib
import os
import sys

import atheris

HERE = os.path.dirname(os.path.abspath(__file__))
# kvmcolo from this tree by the plain path finder, which atheris can hook
# (it does not see modules found through an editable install's finder).
sys.path[:0] = [HERE, os.path.dirname(HERE)]
with atheris.instrument_imports(include=["kvmcolo", "fuzz_targets", "elftools"]):
    import fuzz_targets


def main() -> None:
    name, corpus = sys.argv[1], sys.argv[2]
    target = fuzz_targets.TARGETS[name]
    os.makedirs(corpus, exist_ok=True)
    elf = os.environ.get("KVMCOLO_FUZZ_ELF")
    with open(elf, "rb") if elf else open(os.devnull, "rb") as f:
        image = f.read() or None
    for seed in fuzz_targets.seeds(name, image):
        with open(os.path.join(corpus, hashlib.sha1(seed).hexdigest()), "wb") as out:
            out.write(seed)
    atheris.Setup([sys.argv[0], *sys.argv[3:], corpus], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
