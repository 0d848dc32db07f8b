"""bench/gpu_stages.py, the timing stages of a GPU round (bench/gpu_round.sh peak, shapes,
tshapes), run end to end with --smoke: every case once, at tiny sizes, on the CPU (the CUDA
kernels through their emulator, the Triton ones through the interpreter).  A lent GPU's minutes
are few; a stage that dies on a typo or a changed signature must die here first.  The times mean
nothing: the checks are that the stage ends, writes every case's row, and that each row carries
its settings and positive, finite times."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_stages.py"


def _run_stage(stage, out, **env):
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    r = subprocess.run([sys.executable, str(SCRIPT), stage, "--smoke", "--out", str(out)], cwd=out, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"gpu_stages.py {stage} --smoke failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def _rows(out, name, expected):
    data = json.loads((out / name).read_text())
    assert data["device"].startswith("cpu (--smoke")
    rows = data["results"]
    assert len(rows) == expected, [r.get("op", r.get("what")) for r in rows]
    for r in rows:
        times = {k: v for k, v in r.items() if k.endswith("ms") or k.endswith("_median")}
        assert times, r
        assert all(math.isfinite(v) and v > 0 for v in times.values()), r
    return rows


def _envs(rows, var):
    return sorted(r["env"][var] for r in rows if var in r["env"])


@pytest.mark.cuda_emu
def test_peak_stage(tmp_path):
    _run_stage("peak", tmp_path)
    rows = _rows(tmp_path, "peak.json", 11)
    assert [r["what"].split()[0:2] for r in rows] == [
        ["torch.mm", "bf16"], ["torch.mm", "fp32"], ["device", "copy"]] + [["wgmma_gemm", "96^3"], ["torch.mm", "96^3"]] * 4
    # both operand forms of B, each dtype
    assert [r["what"].split(" c = ")[1] for r in rows if r["what"].startswith("wgmma_gemm")] == ["a b^T", "a b"] * 2
    # the wgmma kernel (emulated) gives the product
    assert all(r["max_err_vs_fp32_mm"] < 1e-5 for r in rows if r["what"].startswith("wgmma_gemm"))


@pytest.mark.cuda_emu
def test_shapes_stage_on_cuda_emulator(tmp_path):
    _run_stage("shapes", tmp_path)
    rows = _rows(tmp_path, "bwd_shapes.json", 14)
    wg = [r for r in rows if "CONTRASTIVE_KERNELS_CUDA_WGMMA" in r["env"]]
    assert _envs(wg, "CONTRASTIVE_KERNELS_CUDA_WGMMA") == ["0", "1"]
    assert all(r["max_lse_diff_vs_mma_sync"] < 1e-4 for r in wg), wg  # the emulated wgmma forward agrees
    assert all(r["max_grad_diff_vs_mma_sync_rel"] < 1e-4 for r in wg), wg  # ... and its backward
    # each comparison ran both of its settings
    assert _envs(rows, "CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS") == ["1", "1", "1", "2", "2", "2"]
    assert _envs(rows, "CONTRASTIVE_KERNELS_CUDA_FUSED_COLS") == ["0", "0", "1", "1"]
    assert sorted(r["env"].get("CONTRASTIVE_KERNELS_CUDA_COL_SPLITS") for r in rows if "bwd_ms" in r
                  and "CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS" not in r["env"]
                  and "CONTRASTIVE_KERNELS_CUDA_WGMMA" not in r["env"]) == ["", "1"]


@pytest.mark.triton
def test_tshapes_stage_on_triton_interpreter(tmp_path):
    _run_stage("tshapes", tmp_path, TRITON_INTERPRET="1")
    rows = _rows(tmp_path, "triton_shapes.json", 8)
    assert _envs(rows, "CONTRASTIVE_KERNELS_TRITON_FUSED_COLS") == ["0", "0", "1", "1"]
    assert _envs(rows, "CONTRASTIVE_KERNELS_TRITON_COL_SPLITS") == ["", "", "1", "1"]
    assert {r["op"] for r in rows} == {"lse forward, compute_col", "lse compute_col: forward, fwd + bwd",
                                        "siglip_loss fwd+bwd"}
