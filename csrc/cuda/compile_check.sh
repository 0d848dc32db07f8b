#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU or a CUDA torch: every .cu for sm_80
# and sm_90a with the flags setup.py uses (the two archs side by side), with ptxas's resource
# report (registers, shared memory, stack frame, spills) written to OUT (default
# /tmp/ck_cuda_check); then the SASS check and the registers of every kernel against
# csrc/cuda/registers.tsv (sass_report.py; when cuobjdump is on PATH).
#   bash csrc/cuda/compile_check.sh [OUT] [--update-registers]
#   bash csrc/cuda/compile_check.sh OUT --one FILE.cu ARCH     (ARCH 80 or 90a: one object, no SASS)
# --update-registers rewrites registers.tsv from this compile (after a deliberate change:
# commit it with the change, the new counts in the message).  --one is CI's per-file job
# (.ci/run), which runs the SASS check once every object is there.  NVCC overrides the nvcc.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out=/tmp/ck_cuda_check
update=0
one=()
while [ $# -gt 0 ]; do
  case $1 in
    --update-registers) update=1 ;;
    --one) one=("$2" "$3"); shift 2 ;;
    *) out=$1 ;;
  esac
  shift
done
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null 2>&1 || { echo "FAIL: nvcc not found ($NVCC)"; exit 1; }
mkdir -p "$out"
rc=0
compile() {  # compile CU ARCH: one object and its ptxas log; prints ok / FAIL
  local cu=$1 arch=$2 name
  name="$(basename "$cu" .cu)_sm$arch"
  if "$NVCC" -std=c++17 -O3 --use_fast_math -lineinfo --expt-relaxed-constexpr -arch=sm_$arch \
      -Xptxas -v -I"$here/.." -c "$cu" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    spills=$(grep -cE "[1-9][0-9]* bytes (spill|stack)" "$out/$name.log")
    if grep -qi "warning" "$out/$name.log"; then
      # (a warning has hidden real defects here: a template argument list with a comma inside
      # CK_LAUNCH split the macro's arguments and dropped the stream, "expression has no effect")
      echo "FAIL $name: compiler warnings (see $out/$name.log)"; grep -i "warning" "$out/$name.log" | head -5; return 1
    fi
    echo "ok   $name (kernels reporting spills/stack: $spills)"
  else
    grep -v "^ptxas info" "$out/$name.log" | tail -40; echo "FAIL $name (see $out/$name.log)"; return 1
  fi
}
if [ ${#one[@]} -eq 2 ]; then
  compile "${one[0]}" "${one[1]}"
  exit $?
fi
# every (file, arch) compile at once, at most CK_COMPILE_JOBS (default: the cores) running
maxj=${CK_COMPILE_JOBS:-$(nproc 2>/dev/null || echo 2)}
pids=()
for cu in "$here"/*.cu; do
  for arch in 90a 80; do
    while [ "$(jobs -rp | wc -l)" -ge "$maxj" ]; do wait -n; done
    compile "$cu" "$arch" &
    pids+=($!)
  done
done
for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
# SASS: tensor-core MMAs in every tile kernel, no local memory; registers against the table.
if [ $update -eq 1 ]; then
  regs=(--write-registers "$here/registers.tsv")
else
  regs=(--registers "$here/registers.tsv")
fi
python3 "$here/sass_report.py" "${regs[@]}" "$out"/*.o >"$out/sass.txt" || rc=1
grep -E "^sass_report|\^|registers" "$out/sass.txt"
echo "sass: $(grep -c ' HMMA=[1-9]' "$out/sass.txt") kernels with HMMA, $(grep -c 'HGMMA=[1-9]' "$out/sass.txt") with HGMMA, report in $out/sass.txt"
exit $rc
