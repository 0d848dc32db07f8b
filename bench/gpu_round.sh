#!/usr/bin/env bash
# One GPU round for contrastive_kernels, run on the lent device machine through the
# device tool's `run` (the repository is copied there; $OUT comes back).
#
#   bash bench/gpu_round.sh [STAGE ...]        (default: info build test peak)
#
# Files back: steps.txt, round.log, tests.log, junit.xml, peak.json (+ build.log on a
# failed build); bench writes $OUT/bench/results.{json,md,png}: run `bench` in a call
# of its own (at most 8 files come back per call).
#
# Stages (split them across calls so each call stays well inside 10 minutes; a fresh
# machine needs `build` again, a warm one keeps the build between calls):
#   info     nvidia-smi, torch / triton / nvcc versions
#   build    pip install -e . with the CUDA kernels for sm_90a ($OUT/build.log if it fails)
#   ptxas    nvcc -Xptxas -v resource report + SASS tensor-core instruction counts
#   test     pytest (GPU tests and backend-generic tests): $OUT/tests.log, $OUT/junit.xml
#            (TEST_MARKS / TEST_K / TEST_PATHS / TEST_TIMEOUT override what runs)
#   sanitize compute-sanitizer memcheck + racecheck on the tiny CUDA cases
#   peak     bf16 dense matmul ceiling (torch.mm 8192^3), the wgmma kernel's rate on the same
#            size (csrc/cuda/wgmma_gemm.cu against torch.mm, its error beside), device copy bandwidth
#   bench    python -m contrastive_kernels bench --out $OUT/bench (skipped if it fails), then
#            bench --derive-auto: $OUT/bench/auto_cuda_rules.py, auto's cuda/triton rule table
#   shapes   the CUDA lse forward and backward with one and with two warp groups per block
#            (CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS=1 / 2, csrc/cuda/family_tiles.cuh bwd_groups),
#            and with and without column splits at small N (CONTRASTIVE_KERNELS_CUDA_COL_SPLITS=1
#            against plan_pass's count), and SupCon (the LSE_LABELS kernels) with one and two
#            groups, the forward in one pass against two (CONTRASTIVE_KERNELS_CUDA_FUSED_COLS=0), and
#            the 16-bit forward with wgmma against mma.sync (CONTRASTIVE_KERNELS_CUDA_WGMMA=1):
#            $OUT/bwd_shapes.json; decides bwd_groups' D threshold, checks plan_pass's split rule
#            and whether the fused forward wins at every size
#   tshapes  the Triton lse forward in one pass against two (CONTRASTIVE_KERNELS_TRITON_FUSED_COLS=0)
#            and the Triton lse (fwd, fwd + bwd) and SigLIP (fwd + bwd) with and without column
#            splits at small N (CONTRASTIVE_KERNELS_TRITON_COL_SPLITS=1): $OUT/triton_shapes.json
#   ncu      Nsight Compute on one lse backward launch (optional, slow)
#
# Every stage runs even if an earlier one failed; each stage's exit code is appended to
# $OUT/steps.txt and the script ends with a short table.  Only plain files at most two
# folders below $OUT come back (at most 8 files): logs are kept few and flat.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ck_out}"
export OUT
mkdir -p "$OUT"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT" || exit 1
PY="${PYTHON:-python3}"
STEPS="$OUT/steps.txt"
LOG="$OUT/round.log"   # everything except build/test logs goes here
: >>"$STEPS"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
export CONTRASTIVE_KERNELS_FORCE_CUDA=1

# Peers carried as wheels (bench/peer_wheels.sh, then `carry: [".whl"]`): installed apart, without
# their dependencies, and put on PYTHONPATH for every stage (bench compares against them).
PEERS_NOTE="no peer wheels carried (.whl)"
if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$ROOT"/.whl/*.whl >/tmp/ck_peers.log 2>&1; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    PEERS_NOTE="peer wheels on PYTHONPATH: $(cd "$ROOT/.whl" && echo *.whl)"
  else
    PEERS_NOTE="peer wheels failed to install: $(tail -2 /tmp/ck_peers.log)"
  fi
fi
echo "$PEERS_NOTE" | tee -a "$LOG"

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(info build test peak)

record() {  # record NAME RC SECONDS
  printf '%-10s rc=%-4s %5ss  %s\n' "$1" "$2" "$3" "$(date -u +%H:%M:%S)" | tee -a "$STEPS"
}

run_stage() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "==================== $name ====================" | tee -a "$LOG"
  "$@"
  local rc=$?
  record "$name" "$rc" "$((SECONDS - t0))"
}

stage_info() {
  {
    nvidia-smi -L
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv
    nvcc --version | tail -2
    "$PY" -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('triton', triton.__version__); print(torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
    git -C "$ROOT" log --oneline -1 2>/dev/null || true
  } 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

stage_build() {
  set -o pipefail
  "$PY" -m pip install --no-build-isolation --no-deps -e . >/tmp/ck_build.log 2>&1
  local rc=$?
  set +o pipefail
  tail -5 /tmp/ck_build.log | tee -a "$LOG"
  # The full log comes back only when the build failed (at most 8 files come back).
  [ "$rc" -ne 0 ] && cp /tmp/ck_build.log "$OUT/build.log"
  (cd /tmp && "$PY" -m contrastive_kernels info) 2>&1 | tee -a "$LOG"
  (cd /tmp && "$PY" -c "import contrastive_kernels as ck, torch; print(ck.__file__); print('cuda backends:', ck.available_backends(device='cuda') if hasattr(ck, 'available_backends') else '?'); print('has CUDA lse kernel:', torch._C._dispatch_has_kernel_for_dispatch_key('contrastive_kernels::lse_forward', 'CUDA'))") 2>&1 | tee -a "$LOG"
  return $rc
}

stage_ptxas() {
  # Resource report of every kernel (registers, smem, spills) and tensor-core
  # instruction counts of the sm_90a build: expect HMMA.16816.F32(.BF16) and
  # HMMA.1688.F32.TF32 (the mma.sync kernels), HGMMA.64x128x16.F32.BF16 / .F16 (the wgmma
  # kernel), no LDL/STL.
  {
    bash csrc/cuda/compile_check.sh /tmp/ck_ptxas
    grep -hE "Compiling|registers|spill|stack" /tmp/ck_ptxas/*_sm90a.log
    for o in /tmp/ck_ptxas/*_sm90a.o; do
      echo "--- SASS instruction mix of $o"
      cuobjdump --dump-sass "$o" | grep -oE "(HMMA|HGMMA|LDGSTS|LDSM|LDS|LDL|STL|FFMA|MUFU)[.A-Z0-9]*" | sort | uniq -c | sort -rn | head -20
    done
  } 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

stage_test() {
  # One pytest run: the CUDA / Triton tests and the backend-generic family tests (they
  # pick up "cuda" through helpers.backend_params); slow and multi-process tests apart.  With
  # the default paths, tests/test_wgmma.py (the wgmma kernels' first run on hardware) runs in a
  # second process, its output appended to tests.log: a fault there (a sticky CUDA error) cannot
  # fail the rest.
  local ignore=() rc rc2=0
  [ -z "${TEST_PATHS:-}" ] && ignore=(--ignore=tests/test_wgmma.py)
  (cd "$ROOT" && timeout "${TEST_TIMEOUT:-420}" "$PY" -m pytest -q -rfE --maxfail=30 \
      -m "${TEST_MARKS:-not slow and not distributed}" ${TEST_K:+-k "$TEST_K"} --junitxml="$OUT/junit.xml" \
      ${ignore[@]+"${ignore[@]}"} ${TEST_PATHS:-tests} >"$OUT/tests.log" 2>&1)
  rc=$?
  tail -3 "$OUT/tests.log" | tee -a "$LOG"
  if [ ${#ignore[@]} -gt 0 ]; then
    echo "=== tests/test_wgmma.py (a process of its own)" >>"$OUT/tests.log"
    (cd "$ROOT" && timeout 180 "$PY" -m pytest -q -rfE -m "${TEST_MARKS:-not slow and not distributed}" \
        ${TEST_K:+-k "$TEST_K"} tests/test_wgmma.py >>"$OUT/tests.log" 2>&1)
    rc2=$?
    [ $rc2 -eq 5 ] && rc2=0  # (no test selected)
    echo "tests/test_wgmma.py: rc=$rc2, $(tail -1 "$OUT/tests.log")" | tee -a "$LOG"
  fi
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30 | tee -a "$LOG"
  [ $rc -ne 0 ] && return $rc
  return $rc2
}

stage_sanitize() {
  local rc=0
  for tool in memcheck racecheck; do
    (cd "$ROOT" && timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 \
        "$PY" -m pytest -q -x -k sanitizer tests/test_cuda_backend.py) >>"$LOG" 2>&1 || rc=$?
    echo "compute-sanitizer $tool rc=$rc" | tee -a "$LOG"
  done
  return $rc
}

stage_peak() {
  (cd /tmp && "$PY" "$ROOT/bench/gpu_stages.py" peak --out "$OUT") 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

stage_bench() {
  mkdir -p "$OUT/bench"
  if ! (cd /tmp && "$PY" -m contrastive_kernels bench --help) >/dev/null 2>&1; then
    echo "bench subcommand not available; skipped" | tee -a "$LOG"
    return 0
  fi
  (cd /tmp && timeout 480 "$PY" -m contrastive_kernels bench --out "$OUT/bench" ${BENCH_ARGS:-}) 2>&1 \
      | tail -40 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ]; then echo "bench failed (rc=$rc); continuing" | tee -a "$LOG"; fi
  # auto's cuda/triton rule from this run (commit it as python/contrastive_kernels/_auto_cuda_rules.py)
  if [ -f "$OUT/bench/results.json" ]; then
    (cd /tmp && "$PY" -m contrastive_kernels bench --derive-auto "$OUT/bench/results.json" \
        --auto-out "$OUT/bench/auto_cuda_rules.py") 2>&1 | tee -a "$LOG"
  fi
  return "$rc"
}

stage_shapes() {
  # bench/gpu_stages.py shapes (tests/test_gpu_stages.py runs it on the emulator at tiny sizes)
  (cd /tmp && timeout 300 "$PY" "$ROOT/bench/gpu_stages.py" shapes --out "$OUT") 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

stage_tshapes() {
  # bench/gpu_stages.py tshapes (tests/test_gpu_stages.py runs it on the interpreter at tiny
  # sizes).  Autotuning compiles every config on the first call of each key (minutes): a call of
  # its own.
  (cd /tmp && timeout 420 "$PY" "$ROOT/bench/gpu_stages.py" tshapes --out "$OUT") 2>&1 | tee -a "$LOG"
  return "${PIPESTATUS[0]}"
}

stage_ncu() {
  # The lse launches of a CLIP-sized problem (bf16, N = M = 8192, D = 512): the fused forward (row
  # and column lse in one pass, launch_fused_cols), backward row and column passes.  MemoryWorkloadAnalysis shows the shared-memory
  # wavefronts against their peak, ComputeWorkloadAnalysis the tensor pipe: bench/NOTES.md
  # "Shared-memory wavefronts per MMA" predicts the mma loops bound by the first.
  (cd /tmp && timeout 300 ncu --launch-count 4 --kernel-name regex:family_tile_kernel --section SpeedOfLight \
      --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
      "$PY" - <<'EOF') 2>&1 | tail -240 | tee -a "$LOG"
import torch, contrastive_kernels._families as fam
q = torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(8192, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
row, col = fam.lse("cuda", q, k, torch.tensor(10.0, device="cuda"), compute_col=True)
(row.sum() + col.sum()).backward()
torch.cuda.synchronize()
EOF
  return "${PIPESTATUS[0]}"
}

for st in "${stages[@]}"; do
  case "$st" in
    info|build|ptxas|test|sanitize|peak|bench|shapes|tshapes|ncu) run_stage "$st" "stage_$st" ;;
    *) echo "unknown stage $st" | tee -a "$LOG"; record "$st" 2 0 ;;
  esac
done
echo "==================== steps ===================="
cat "$STEPS"
