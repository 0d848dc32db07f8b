"""SASS instruction counts of the compiled CUDA kernels (no GPU needed): tensor-core MMAs
(HMMA, and HGMMA: wgmma), ldmatrix and plain shared loads (LDSM, LDS), cp.async copies (LDGSTS) and
local-memory traffic (LDL / STL, i.e. spills); and the registers per thread of every kernel
against a checked-in table.

    python csrc/cuda/sass_report.py [--registers TABLE | --write-registers TABLE] OBJ.o [...]

Needs cuobjdump and nvdisasm on PATH (CUDA toolkit, or the PyPI wheels nvidia-cuda-cuobjdump
and nvidia-cuda-nvdisasm).  Exits 1 if a wgmma kernel (wgmma_gemm_kernel, family_tile_kernel<...,
WG = true>) has no HGMMA in its sm_90a code or touches local memory, if another tile kernel
(family_tile_kernel, gemm64_kernel) has no HMMA or touches local memory, a 16-bit one has no
LDSM, or (--registers) if a kernel uses more registers than TABLE records, or is not in it, for
the objects' architectures, when nvcc is the version TABLE was
written with.  The tile kernels sit at ptxas's occupancy steps: semantically neutral edits have
moved them by up to 41 registers and across a block per SM (bench/NOTES.md), which only a GPU
would otherwise show.  A deliberate change rewrites the table (--write-registers, or
csrc/cuda/compile_check.sh --update-registers) in the same commit."""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys

TILE_KERNELS = ("family_tile_kernel", "gemm64_kernel")
WGMMA_KERNELS = ("wgmma_gemm_kernel",)  # sm_90a: HGMMA (elsewhere they trap: not checked)
COUNTED = ("HMMA", "HGMMA", "LDSM", "LDS", "LDGSTS", "LDL", "STL")


def kernel_counts(obj: str) -> dict[tuple[str, str], collections.Counter]:
    """Instruction counts per (arch, mangled kernel name) of the SASS in obj."""
    res = subprocess.run(["cuobjdump", "-sass", obj], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump -sass {obj} failed: {res.stderr.strip() or res.stdout.strip()}")
    sass = res.stdout
    counts: dict[tuple[str, str], collections.Counter] = {}
    current, arch = None, "?"
    for line in sass.splitlines():
        m = re.search(r"code for (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = (arch, m.group(1))
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


def math_type(pretty: str) -> str | None:
    """The element type a tile kernel's MMAs take: family_tile_kernel<T, ...>'s T,
    gemm64_kernel<TA, TB, MT, ...>'s MT; None for other kernels."""
    for kernel, index in (("family_tile_kernel<", 0), ("gemm64_kernel<", 2)):
        if kernel in pretty:
            args = pretty.split(kernel, 1)[1].split(", ")
            return args[index].strip() if len(args) > index else None
    return None


def is_wgmma_tile(pretty: str) -> bool:
    """family_tile_kernel<T, FAM, TRANS, BWD, G, SPLIT, WG> with WG true (its S tiles from wgmma)."""
    if "family_tile_kernel<" not in pretty:
        return False
    args = pretty.split("family_tile_kernel<", 1)[1].split(">", 1)[0].split(", ")
    return len(args) > 6 and args[6].strip() == "true"


def resource_usage(obj: str) -> list[tuple[str, str, int]]:
    """(arch, demangled kernel, registers per thread) of every kernel in obj (cuobjdump -res-usage)."""
    res = subprocess.run(["cuobjdump", "-res-usage", obj], capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"sass_report: cuobjdump -res-usage {obj} failed: {res.stderr.strip()}")
    rows, arch, name = [], None, None
    for line in res.stdout.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.match(r"\s*Function (\S+):", line):
            name = m.group(1)
        elif (m := re.search(r"\bREG:(\d+)", line)) and name is not None:
            rows.append((arch, demangle(name), int(m.group(1))))
            name = None
    return rows


def nvcc_version() -> str:
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release [\d.]+, (V[\d.]+)", out)
    return m.group(1) if m else "unknown"


def write_registers(table: str, rows: list[tuple[str, str, int]]) -> None:
    with open(table, "w") as f:
        f.write(f"# nvcc {nvcc_version()}: registers per thread of every CUDA kernel (cuobjdump -res-usage),\n"
                "# checked by csrc/cuda/sass_report.py --registers (CI): a kernel above its count fails.\n"
                "# Rewrite with csrc/cuda/compile_check.sh --update-registers after a deliberate change.\n")
        for arch, kernel, regs in sorted(set(rows)):
            f.write(f"{arch}\t{kernel}\t{regs}\n")
    print(f"registers of {len(set(rows))} kernels written to {table}")


def check_registers(table: str, rows: list[tuple[str, str, int]]) -> int:
    """Compare with the table; 1 on a rise or an unrecorded kernel (same nvcc), else 0."""
    version, want = "unknown", {}
    with open(table) as f:
        for line in f:
            if m := re.match(r"# nvcc (\S+):", line):
                version = m.group(1)
            elif line.strip() and not line.startswith("#"):
                arch, kernel, regs = line.rstrip("\n").split("\t")
                want[(arch, kernel)] = int(regs)
    here = nvcc_version()
    strict = here == version
    archs = {a for a, _, _ in rows}
    bad = 0
    for arch, kernel, regs in sorted(set(rows)):
        old = want.get((arch, kernel))
        if old is None:
            print(f"  registers: {arch} {kernel[:90]}: {regs}, not in {table}")
            bad += 1
        elif regs > old:
            print(f"  registers: {arch} {kernel[:90]}: {old} -> {regs}")
            bad += 1
        elif regs < old:
            print(f"  registers (lower, update the table): {arch} {kernel[:90]}: {old} -> {regs}")
    seen = {(a, k) for a, k, _ in rows}
    gone = [k for k in want if k[0] in archs and k not in seen]
    if gone:  # (every kernel of a removed one, or of the .cu files not given here)
        print(f"  registers: {len(gone)} kernels of the table are in none of these objects (a removed kernel: "
              f"update the table), e.g. {gone[0][0]} {gone[0][1][:70]}")
    print(f"registers: {len(set(rows))} kernels against {table} (nvcc {version}): "
          f"{bad} above their count or unrecorded" + ("" if strict else f"; nvcc here is {here}, so not failed"))
    return 1 if bad and strict else 0


def main(argv: list[str]) -> int:
    table, write = None, False
    if argv and argv[0] in ("--registers", "--write-registers"):
        table, write, argv = argv[1], argv[0] == "--write-registers", argv[2:]
    objs = argv
    if shutil.which("cuobjdump") is None or shutil.which("nvdisasm") is None:
        print("sass_report: cuobjdump / nvdisasm not on PATH; skipped")
        return 0
    if table is not None:
        rows = [r for obj in objs for r in resource_usage(obj)]
        if write:
            write_registers(table, rows)
            reg_bad = 0
        else:
            reg_bad = check_registers(table, rows)
    else:
        reg_bad = 0
    bad = 0
    for obj in objs:
        print(f"== {obj}")
        for (arch, name), c in kernel_counts(obj).items():
            pretty = demangle(name)
            print(f"  {pretty[:88]:88s} " + " ".join(f"{k}={c[k]}" for k in COUNTED))
            wg = any(t in pretty for t in WGMMA_KERNELS) or is_wgmma_tile(pretty)
            if wg:  # sm_90a: HGMMA; other archs compile these to a trap
                if arch == "sm_90a" and (c["HGMMA"] == 0 or c["LDL"] or c["STL"]):
                    print("  ^ wgmma kernel without HGMMA or with local-memory traffic (sm_90a)")
                    bad += 1
                continue
            if any(t in pretty for t in TILE_KERNELS) and (c["HMMA"] == 0 or c["LDL"] or c["STL"]):
                print("  ^ tile kernel without tensor-core MMA or with local-memory traffic")
                bad += 1
            if math_type(pretty) in ("__half", "__nv_bfloat16") and c["LDSM"] == 0:
                print("  ^ 16-bit tile kernel without ldmatrix (LDSM) fragment loads")
                bad += 1
    return 1 if bad or reg_bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
