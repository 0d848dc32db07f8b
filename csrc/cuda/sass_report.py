"""SASS instruction counts of the compiled CUDA kernels (no GPU needed): tensor-core MMAs
(HMMA), cp.async copies (LDGSTS) and local-memory traffic (LDL / STL, i.e. spills).

    python csrc/cuda/sass_report.py OBJ.o [OBJ.o ...]

Needs cuobjdump and nvdisasm on PATH (CUDA toolkit, or the PyPI wheels nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm).  Exits 1
if a tile kernel (family_tile_kernel, gemm64_kernel) has no HMMA or touches local memory."""
from __future__ import annotations

import collections
import re
import shutil
import subprocess
import sys

TILE_KERNELS = ("family_tile_kernel", "gemm64_kernel")
COUNTED = ("HMMA", "LDGSTS", "LDL", "STL")


def kernel_counts(obj: str) -> dict[str, collections.Counter]:
    res = subprocess.run(["cuobjdump", "-sass", obj], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump -sass {obj} failed: {res.stderr.strip() or res.stdout.strip()}")
    sass = res.stdout
    counts: dict[str, collections.Counter] = {}
    current = None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current] = collections.Counter()
            continue
        m = re.search(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if current is not None and m:
            counts[current][m.group(1)] += 1
    return counts


def demangle(name: str) -> str:
    out = subprocess.run(["c++filt"], input=name, capture_output=True, text=True).stdout.strip() or name
    out = re.sub(r"ck::cuda::|\(anonymous namespace\)::|tile::", "", out)
    return re.sub(r"\((GemmParams|FamilyParams|ck).*", "", out)


def main(objs: list[str]) -> int:
    if shutil.which("cuobjdump") is None or shutil.which("nvdisasm") is None:
        print("sass_report: cuobjdump / nvdisasm not on PATH; skipped")
        return 0
    bad = 0
    for obj in objs:
        print(f"== {obj}")
        for name, c in kernel_counts(obj).items():
            pretty = demangle(name)
            print(f"  {pretty[:88]:88s} " + " ".join(f"{k}={c[k]}" for k in COUNTED))
            if any(t in pretty for t in TILE_KERNELS) and (c["HMMA"] == 0 or c["LDL"] or c["STL"]):
                print(f"  ^ tile kernel without tensor-core MMA or with local-memory traffic")
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
