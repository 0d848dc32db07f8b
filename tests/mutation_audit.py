"""Do the tests catch a wrong kernel?  A mutation audit (not collected by pytest; minutes per
mutant, so not in CI).

Each mutant below is one plausible kernel bug, written as an exact edit of one source line or
block: a dropped term of the online log-sum-exp, a mask with the wrong sign, a merge that forgets
the exact 1s at the maximum, a gradient missing a row scale, a swizzle left out, a split's
partials written over each other.  For each, the script copies the tree (Triton, Python) or
edits a build tree and rebuilds the extensions (C++ and the CUDA emulator: ninja recompiles what
the edit touches), runs the named tests with `-x` and records whether they failed ("killed") or
passed ("survived": the suite missed a bug, a defect of the tests).

Kinds, by the mutant's file: "triton" (kernels/*.py, run under TRITON_INTERPRET=1 with the
tests' `triton` marker), "py" (the package's Python glue, python/contrastive_kernels/*.py and
compat/*.py, named relative to python/contrastive_kernels/: a copied tree like the Triton ones,
but without TRITON_INTERPRET and with the marker "not triton and not slow", so the losses run on
the C++ CPU backend and the reference), "cuda" (csrc/cuda/*) and "cpu" (the other C++ sources).

    python tests/mutation_audit.py --list
    python tests/mutation_audit.py [--only NAME,...] [--kind triton|py|cuda|cpu] [--out audit.jsonl]

The C++ mutants need a tree built with the emulator (`--build-tree DIR`: made on first use, a
`git clone` of this checkout, reset to its committed HEAD on every later run: commit before
auditing native code; about 3 minutes on one core, then ~35 s per CUDA mutant).
Results of the last full run: bench/NOTES.md "Mutation audit".
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")


def _t(*names):
    return [os.path.join(TESTS, n) for n in names]


LSE_T = ["-m", "triton"] + _t("test_triton_lse.py", "test_lse_family.py")
LSE2_T = ["-m", "triton", "-k", "two_scales or hard_negative or hcl"] + _t("test_triton_lse.py", "test_lse_family.py",
                                                                          "test_formulas.py")
PAIR_T = ["-m", "triton"] + _t("test_pairwise_family.py", "test_siglip.py")
XC_T = ["-m", "triton"] + _t("test_xcorr_family.py", "test_barlow_vicreg.py")
CUDA_T = ["-k", "cuda"] + _t("test_lse_family.py", "test_pairwise_family.py", "test_cuda_emulator.py")
XC_CUDA_T = ["-k", "cuda"] + _t("test_xcorr_family.py")
LSE2_CUDA_T = ["-k", "cuda and (two_scales or lse2)"] + _t("test_lse_family.py", "test_dispatch.py")
WG_T = ["-k", "cuda and (float16 or bfloat16)"] + _t("test_wgmma.py", "test_lse_family.py")
CPU_T = ["-k", "cpu"] + _t("test_lse_family.py", "test_formulas.py", "test_compat.py")
CPU_LSE2_T = ["-k", "cpu and (two_scales or lse2 or hard_negative or hcl)"] + _t("test_lse_family.py",
                                                                                 "test_dispatch.py", "test_formulas.py")
SIM_T = ["-m", "triton"] + _t("test_similarity_family.py")
SIM_CUDA_T = ["-k", "cuda"] + _t("test_similarity_family.py", "test_cuda_emulator.py")
SIM_CPU_T = ["-k", "cpu"] + _t("test_similarity_family.py")
PAIR_CPU_T = ["-k", "cpu"] + _t("test_pairwise_family.py", "test_siglip.py")
XC_CPU_T = ["-k", "cpu"] + _t("test_xcorr_family.py", "test_barlow_vicreg.py")
PAIR_CUDA_T = ["-k", "cuda"] + _t("test_pairwise_family.py", "test_siglip.py")
WGMMA = {"CONTRASTIVE_KERNELS_CUDA_WGMMA": "1"}
EMU = {"CONTRASTIVE_KERNELS_CUDA_EMULATE": "1"}  # (py mutants seen only on the CUDA kernels, emulated)

LSE_PY, PAIR_PY, XC_PY = "kernels/lse.py", "kernels/pairwise.py", "kernels/xcorr.py"
TILES, CPU_LSE, XC_CU = "csrc/cuda/family_tiles.cuh", "csrc/cpu/lse.cpp", "csrc/cuda/xcorr.cu"
SIM_PY, SIM_CPU, SIM_CU = "kernels/similarity.py", "csrc/cpu/similarity.cpp", "csrc/cuda/similarity.cu"
CPU_PAIR, CPU_XC, TILE_MMA = "csrc/cpu/pairwise.cpp", "csrc/cpu/xcorr.cpp", "csrc/cuda/tile_mma.cuh"


# The Python glue ("py" mutants: run_copied adds the marker "not triton and not slow").  The
# distributed tests launch each world size once (every case in the same gloo processes, ~10 s
# a world); -k keeps the asserted cases to the mutant's loss.
def _py_t(*names, k=None):
    return (["-k", k] if k else []) + _t(*names)


def _dist_t(k):
    return _py_t("test_distributed.py", k=k)


DIST, FUNC, NN_PY, FAM_PY = "distributed.py", "functional.py", "nn.py", "_families.py"
LIGHTLY, OPEN_CLIP, PML = "compat/lightly.py", "compat/open_clip.py", "compat/pytorch_metric_learning.py"

# (name, file, old, new, tests[, env])
MUTANTS = [
    # ---- Triton, log-sum-exp family: masks
    ("diag_trans_sign", LSE_PY, "keep = keep & (o_idx[:, None] != n_idx[None, :] + diag_offset)",
     "keep = keep & (o_idx[:, None] != n_idx[None, :] - diag_offset)", LSE_T),
    ("pos_trans_drop", LSE_PY, "            keep = keep & (o_idx[:, None] != n_pos[None, :])\n",
     "            keep = keep\n", LSE_T),
    # online log-sum-exp
    ("rise_forgets_ties", LSE_PY, "l = tl.where(up, (l + k) * _exp_u(m - ref, NAT), l)",
     "l = tl.where(up, l * _exp_u(m - ref, NAT), l)", LSE_T),
    ("rise_keeps_count", LSE_PY, "    k = tl.where(up, 0.0, k)\n", "", LSE_T),
    # the scores' unit: float32 back in base 2 (the saved LSE converted back: p off by ~|S| 1e-7),
    # and a unit mix-up (natural scores, base-2 exps) that only float32 would take
    ("float32_base2_scores", LSE_PY, "    return dtype == torch.float32\n", "    return False\n",
     ["-k", "large_logits"] + _t("test_lse_family.py")),
    ("natural_scores_exp2", LSE_PY, "    if NAT:\n        return tl.exp(x)\n", "    if NAT:\n        return tl.exp2(x)\n",
     ["-k", "large_logits"] + _t("test_lse_family.py")),
    ("finish_drops_ties", LSE_PY, "log1p(tl.where(empty, 0.0, (k - 1.0) + l)))",
     "log1p(tl.where(empty, 0.0, l)))", LSE_T),
    ("neginf_not_nan", LSE_PY,
     'return tl.where(keep, tl.where(s == float("-inf"), float("nan"), s), float("-inf"))',
     'return tl.where(keep, s, float("-inf"))', LSE_T),
    # merges (column splits, fused columns)
    ("merge_forgets_ties", LSE_PY, "l += tl.where(at, ls, (ls + ks) * _exp_u(ms - ref, NAT))",
     "l += tl.where(at, ls, ls * _exp_u(ms - ref, NAT))", LSE_T),
    ("merge_target_once", LSE_PY, "            x2 += tl.load(p + 3 * FIELD, mask=ok, other=0.0)",
     "            x2 = tl.load(p + 3 * FIELD, mask=ok, other=0.0)", LSE_T),
    ("cols_empty_slot_zero", LSE_PY,
     'tl.store(base + e * NI, tl.full((BLOCK_I,), float("-inf"), tl.float32), mask=n_ok)',
     "tl.store(base + e * NI, tl.zeros((BLOCK_I,), dtype=tl.float32), mask=n_ok)", LSE_T),
    # backward
    ("bwd_no_keep", LSE_PY, "        ds = tl.where(keep, ds, 0.0)\n", "", LSE_T),
    ("dscale_no_rs", LSE_PY, "tl.store(D_SCALE + pid_s * NO + o_idx, o_rs * r_acc, mask=o_ok & first)",
     "tl.store(D_SCALE + pid_s * NO + o_idx, r_acc, mask=o_ok & first)", LSE_T),
    ("drs_no_scale", LSE_PY, "tl.store(D_ORS + pid_s * NO + o_idx, scale * r_acc, mask=o_ok & first)",
     "tl.store(D_ORS + pid_s * NO + o_idx, r_acc, mask=o_ok & first)", LSE_T),
    # two scales in one pass (lse2, HCL)
    ("lse2_bwd_scale0_is_scale1", LSE_PY, "p = ds * scale + ds0 * scale0", "p = ds * scale + ds0 * scale", LSE2_T),
    ("lse2_split_state_sum", LSE_PY, "tl.store(base0 + field, l0, mask=o_ok)", "tl.store(base0 + field, l, mask=o_ok)",
     LSE2_T),
    ("lse2_dscale0_no_rs", LSE_PY, "tl.store(D_SCALE0 + pid_s * NO + o_idx, o_rs * r_acc0, mask=o_ok & first)",
     "tl.store(D_SCALE0 + pid_s * NO + o_idx, r_acc0, mask=o_ok & first)", LSE2_T),
    ("lse2_drs_drops_scale0", LSE_PY, "scale * r_acc + scale0 * r_acc0, mask=o_ok & first)",
     "scale * r_acc, mask=o_ok & first)", LSE2_T),
    ("lse2_trans_no_row_term0", LSE_PY,
     "ds0 += tl.load(I_G0 + n64, mask=n_ok, other=0.0)[None, :] * _exp_u(s0 - i_lse02[None, :], NAT)",
     "ds0 += 0.0", LSE2_T),
    ("lse2_fwd_scale0_is_scale1", LSE_PY,
     "_online(m0, l0, k0, _kept(_scaled(acc, o_rs, i_rs, c20, HAS_ORS, HAS_IRS), keep), NAT)",
     "_online(m0, l0, k0, _kept(_scaled(acc, o_rs, i_rs, c2, HAS_ORS, HAS_IRS), keep), NAT)", LSE2_T),
    ("r_acc_no_irs", LSE_PY, "            if HAS_IRS:\n                t = t * i_rs[None, :]\n", "", LSE_T),
    ("dgrad_f16_no_irs", LSE_PY, "x = (x.to(tl.float32) * i_rs[:, None]).to(I.dtype.element_ty)", "x = x", LSE_T),
    ("target_masked_grad", LSE_PY, "            ds = ds - tl.where(is_t, tl.where(keep, 0.0, w), 0.0)\n", "", LSE_T),
    ("labels_trans_pw", LSE_PY, "                              ds - tl.where(is_p, pw[None, :], 0.0))",
     "                              ds)", LSE_T),
    ("chunked_d_step", LSE_PY, "    for d0 in range(0, D, BLOCK_D):", "    for d0 in range(0, D - 1, BLOCK_D):", LSE_T),
    ("dout_mask_d", LSE_PY, "mask=o_ok[:, None] & (dcol[None, :] < D))", "mask=o_ok[:, None])", LSE_T),
    # ---- Triton, pairwise (SigLIP) family
    ("pw_dk_sigmoid_sign", PAIR_PY, "ds = tl.where(keep, g[:, None] * sg * _sigmoid(y), 0.0)\n        qt = tl.load(",
     "ds = tl.where(keep, g[:, None] * sg * _sigmoid(-y), 0.0)\n        qt = tl.load(", PAIR_T),
    ("pw_dscale_no_dot", PAIR_PY, "        s_dsd += tl.sum(ds * dot, axis=1).to(tl.float64)\n        if NEED_Q:",
     "        s_dsd += tl.sum(ds, axis=1).to(tl.float64)\n        if NEED_Q:", PAIR_T),
    ("pw_split_offset", PAIR_PY, "tl.store(out_ptr + tl.program_id(1).to(tl.int64) * N + rows, acc, mask=rows < N)",
     "tl.store(out_ptr + rows, acc, mask=rows < N)", PAIR_T),
    # ---- Triton, cross-correlation family
    ("xc_gram_keeps_diag", XC_PY, "offdiag = ((ga * gb).sum() - diag_sq).clamp_min(0.0)",
     "offdiag = (ga * gb).sum().clamp_min(0.0)", XC_T),
    ("xc_gram_w_no_diag", XC_PY, "w = gdiag.double() - 2.0 * g * _diag(a, b)", "w = gdiag.double()", XC_T),
    ("xc_tile_keeps_diag", XC_PY, "v = tl.where(keep & (~on_diag), acc, 0.0)", "v = tl.where(keep, acc, 0.0)", XC_T),
    ("xc_panels_overwrite", XC_PY, "alpha=one, f64=False, accumulate=i > 0)", "alpha=one, f64=False, accumulate=False)",
     XC_T),
    # ---- CUDA tile kernels (on the emulator)
    # two scales in one pass (kLse2, HCL)
    ("cu_lse2_bwd_scale0_is_scale", TILES, "ds = scale * ds1 + scale0 * ds0;", "ds = scale * ds1 + scale * ds0;",
     LSE2_CUDA_T),
    ("cu_lse2_fwd_scale0_is_scale", TILES, "state(scale0, run_m0, run_l0, run_k0);",
     "state(scale, run_m0, run_l0, run_k0);", LSE2_CUDA_T),
    ("cu_lse2_split_state_sum", TILES, "ws[4 * field] = TWO ? l0 : ps;", "ws[4 * field] = TWO ? l : ps;", LSE2_CUDA_T),
    ("cu_lse2_dscale0_of_scale1", TILES, "dbias_part += static_cast<double>(ds0 * dot);",
     "dbias_part += static_cast<double>(ds1 * dot);", LSE2_CUDA_T),
    ("cu_lse2_dx_scaled_twice", TILES, "float v = (TWO ? 1.f : scale) * R[h].rs * accO[nt][e];",
     "float v = scale * R[h].rs * accO[nt][e];", LSE2_CUDA_T),
    ("cu_rise_forgets_ties", TILES, "l = (l + k) * __expf(rm[h] - ref);", "l = l * __expf(rm[h] - ref);", CUDA_T),
    ("cu_diag_sign", TILES, "if (mode & 1) keep = keep && (j != i + diag);",
     "if (mode & 1) keep = keep && (j != i - diag);", CUDA_T),
    ("cu_merge_state_ties", TILES, "l += (ls + ks) * __expf(ms - ref);", "l += ls * __expf(ms - ref);", CUDA_T),
    ("cu_ds_col_term_drop", TILES,
     "if (FAM == kLse && J.lse != -INFINITY) ds += J.g * __expf((x - J.x) - J.lse);", "", CUDA_T),
    ("cu_dbias_sign", TILES, "dbias_part += static_cast<double>(ds);", "dbias_part -= static_cast<double>(ds);",
     CUDA_T),
    ("cu_dx_no_rs", TILES, "float v = (TWO ? 1.f : scale) * R[h].rs * accO[nt][e];",
     "float v = (TWO ? 1.f : scale) * accO[nt][e];", CUDA_T),
    ("cu_dsscale_unscale", TILES, "if (kDsScale) v *= pow2(-ds_e[h]);", "", CUDA_T),
    ("cu_rescale_half_acc", TILES, "              accO[nt][2 * h] *= f;\n", "", CUDA_T),
    ("cu_sxt_reset", TILES,
     "        sxt[tid] = 0.f;  // (the next tile's epilogue is past the step's barrier)\n", "", CUDA_T),
    ("cu_target_masked", TILES,
     "ds = keep ? I.tg + J.tg : -((I.lse != -INFINITY ? I.g : 0.f) + (J.lse != -INFINITY ? J.g : 0.f));",
     "ds = keep ? I.tg + J.tg : 0.f;", CUDA_T),
    # the staging's alignment test passing every base: cp.async 16-byte copies from rows at an odd
    # element offset (the emulator reports the misaligned copy)
    ("cu_aligned16_always", TILES, "return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }", "return true; }",
     ["-k", "cuda"] + _t("test_layouts.py")),
    ("cu_wg_ds_noswizzle", TILES,
     "tile::st_operand(&sds[rl * 64 + ((((cl >> 3) ^ (rl & 7))) << 3) + (cl & 7)], v);",
     "tile::st_operand(&sds[rl * 64 + (((cl >> 3)) << 3) + (cl & 7)], v);", WG_T, WGMMA),
    # CUDA cross-correlation, the tiled backward's panels
    ("cu_xc_panel_diag_shift", XC_CU, "      g.diag_shift = -lo;  // d = r + lo == e = c\n",
     "      g.diag_shift = 0;\n", XC_CUDA_T),
    ("cu_xc_panel_grad_diag", XC_CU, "      g.grad_diag = p.grad_diag + lo;\n", "      g.grad_diag = p.grad_diag;\n",
     XC_CUDA_T),
    # ---- C++ CPU kernels
    ("cpu_col_finish_ties", CPU_LSE, "e[j] = f >= 0.0f ? ((f + f * e[j]) + (cnt[j] - 1.0f)) + rest[j]",
     "e[j] = f >= 0.0f ? ((f * e[j]) + (cnt[j] - 1.0f)) + rest[j]", CPU_T),
    ("cpu_symmetrize_diag", CPU_LSE, "    c[i * b + i] *= 2.0f;\n", "", CPU_T),
    # ---- one-positive SupCon anchors (session 26): the output as (max + log1p(e)) - xp, p - 1 at the
    # positive as exp - 1 (C++ non-symmetric and symmetric rows, Triton both passes, CUDA), and the
    # C++ d scale summed in float32 (the target's exp term, ~1, then taken out for p - 1 ~1e-4)
    ("cpu_labels_out_after_lse", CPU_LSE, "out[i] = (mx - xp) + std::log1p(e);", "out[i] = (mx + std::log1p(e)) - xp;",
     ["-k", "cpu and supcon_one_positive"] + _t("test_lse_family.py")),
    ("cpu_labels_unit_rows_off", CPU_LSE, "const bool unit = lab_w != 0.0f && G.lw[gi] == 1.0f;",
     "const bool unit = false;", ["-k", "cpu and supcon_one_positive"] + _t("test_lse_family.py")),
    ("cpu_labels_unit_pairs_off", CPU_LSE, "const bool row_unit = lw != nullptr && lw[gi] == 1.0f;\n"
     "  auto whole = [&](int64_t j) { return row_unit || (pair && lw[j0 + j] == 1.0f); };",
     "const bool row_unit = false;\n  auto whole = [&](int64_t j) { return false; };",
     ["-k", "cpu and supcon_one_positive"] + _t("test_lse_family.py")),
    ("cpu_dscale_float_products", CPU_LSE, "    acc += static_cast<double>(ds) * g[j];\n    g[j] = ds;\n  }\n  return acc;\n}\n\n"
     "CK_MULTIVERSION double ds_row_c(", "    acc += ds * g[j];\n    g[j] = ds;\n  }\n  return acc;\n}\n\n"
     "CK_MULTIVERSION double ds_row_c(", ["-k", "cpu and lse_target_confident_rows"] + _t("test_lse_family.py")),
    ("labels_out_after_lse", LSE_PY, "_to_nat(m - xp, NAT) + lg, mask=ok)",
     "_to_nat(m, NAT) + lg - _to_nat(xp, NAT), mask=ok)", ["-m", "triton", "-k", "supcon_one_positive"] + _t("test_lse_family.py")),
    ("labels_unit_rows_off", LSE_PY, "            o_unit = o_lw == 1.0\n", "            o_unit = o_lw == 2.0\n",
     ["-m", "triton", "-k", "supcon_one_positive"] + _t("test_lse_family.py")),
    ("labels_unit_trans_off", LSE_PY, "ds = tl.where(is_p & (i_lw == 1.0)[None, :]", "ds = tl.where(is_p & (i_lw == 2.0)[None, :]",
     ["-m", "triton", "-k", "supcon_one_positive"] + _t("test_lse_family.py")),
    ("cu_labels_unit_off", TILES, "ds += w == 1.f ? I.tg : I.g * (__expf((x - I.x) - I.lse) - w);",
     "ds += I.g * (__expf((x - I.x) - I.lse) - w);", ["-k", "cuda and supcon_one_positive"] + _t("test_lse_family.py"),
     EMU),
    ("cpu_tournament_skip", CPU_LSE, "for (int64_t k = 1; k < Lp / 2; ++k)",
     "for (int64_t k = 1; k + 1 < Lp / 2; ++k)", CPU_T),
    ("cpu_sym_pos_involution", CPU_LSE, "      if (P.pos[P.pos[i]] != i) return false;\n", "      (void)i;\n", CPU_T),
    ("cpu_sym_target_involution", CPU_LSE, "      if (P.target[P.target[i]] != i) return false;\n",
     "      (void)i;\n", CPU_T),
    ("cpu_sym_labels_equal", CPU_LSE,
     "  if ((P.mask_mode & (kMaskSameLabel | kLseLabels)) && !(o.ql.is_same(o.kl) || at::equal(o.ql, o.kl))) return false;\n",
     "", CPU_T),
    ("cpu_ds_rc_col", CPU_LSE,
     "const float ds = a * fast_exp((s[j] - rx) - rl) + gc[j] * fast_exp((s[j] - cx[j]) - cl[j]);",
     "const float ds = a * fast_exp((s[j] - rx) - rl);", CPU_T),
    ("cpu_sym_pair_xt", CPU_LSE, "if (t >= 0 && t < bm) xt[j0 + c] = P.scale * g[t * bn + c];",
     "if (t >= 0 && t < bm) xt[j0 + c] = P.scale * g[c * bn + t];", CPU_T),
    ("cpu_labels_pair_dscale", CPU_LSE,
     "raw_pos += static_cast<double>(row_lab + (pair ? w[j0 + j] * lw[j0 + j] : 0.0f)) * gr[j];",
     "raw_pos += static_cast<double>(row_lab) * gr[j];", CPU_T),
    # C++ CPU two scales (lse2, HCL): the second scale's logits, dS and dscale, the combined dS's units
    ("cpu_lse2_rows_scale1", CPU_LSE, "tile_row_logits(*two->P, s0, s0, i0 + r, j0, bn);",
     "tile_row_logits(P, s0, s0, i0 + r, j0, bn);", CPU_LSE2_T),
    ("cpu_lse2_sym_fwd_scale1", CPU_LSE, "symmetric_tile_forward(*two->P, T, W, W.tile2(),",
     "symmetric_tile_forward(P, T, W, W.tile2(),", CPU_LSE2_T),
    ("cpu_lse2_combine_scale1", CPU_LSE, "ds1[j] = scale1 * ds1[j] + scale0 * ds0[j];",
     "ds1[j] = scale1 * ds1[j] + scale1 * ds0[j];", CPU_LSE2_T),
    ("cpu_lse2_sym_dscale0", CPU_LSE, "if (G0 != nullptr && G0->dscale != nullptr) G0->dscale[I] += dsc0;",
     "if (G0 != nullptr && G0->dscale != nullptr) G0->dscale[I] += dsc;", CPU_LSE2_T),
    ("cpu_lse2_item_dscale0", CPU_LSE, "if (two != nullptr && two->G.dscale != nullptr) two->G.dscale[I] += dsc0;",
     "if (two != nullptr && two->G.dscale != nullptr) two->G.dscale[I] += dsc;", CPU_LSE2_T),
    ("cpu_lse2_drscale_scaled", CPU_LSE, "const Tensor dqr = need_q_rscale ? row_dots(q, A) : none;",
     "const Tensor dqr = need_q_rscale ? row_dots(q, A).mul_(P.scale) : none;", CPU_LSE2_T),
    ("cpu_lse2_sym_no_copy", CPU_LSE, "    if (P0 != nullptr) std::copy(g, g + bm * bn, W.tile2());\n", "",
     CPU_LSE2_T),
    # ---- the similarity family
    # Triton: the grouped tile order's last (short) group, the backward's feature chunks, dscale's a_hat
    ("sim_group_tail_tiles", SIM_PY, "pid_n = (pid % per_group) // group_size",
     "pid_n = (pid % per_group) // GROUP_M", SIM_T),
    ("sim_bwd_d_chunk", SIM_PY, "dcol = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)", "dcol = tl.arange(0, BLOCK_DO)",
     SIM_T),
    ("sim_dscale_unnormalized", SIM_PY, "ah = a.float() * ar[:, None] if normalize else a.float()",
     "ah = a.float()", SIM_T),
    # C++ CPU: the clamp branch of the normalization Jacobian; V's row chunks (half inputs)
    ("cpu_sim_small_row_proj", SIM_CPU, "dxhat - nx.xhat * proj.masked_fill(nx.small.unsqueeze(1), 0.0);",
     "dxhat - nx.xhat * proj;", SIM_CPU_T),
    ("cpu_sim_half_v_overwrite", SIM_CPU, "if (needV) V.addmm_(g.t(), na.xhat.slice(0, r0, r1));",
     "if (needV) V = at::mm(g.t(), na.xhat.slice(0, r0, r1));", SIM_CPU_T),
    # CUDA (emulated): a warp reduction one level short; the half dscale's tile count
    ("cu_sim_warp_sum_short", SIM_CU, "for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);",
     "for (int o = 16; o > 1; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);", SIM_CUDA_T),
    ("cu_sim_dot_parts_count", SIM_CU, "(p.dot_parts, similarity_dot_parts(p.n, p.m),",
     "(p.dot_parts, similarity_dot_parts(p.n, p.n),", SIM_CUDA_T),
    # ---- C++ CPU pairwise: the tile skip of "positives only" at a tile edge; log1p's ln2 split
    ("cpu_pw_tile_skip_edge", CPU_PAIR, "return hi >= j0 && lo < j0 + bn;", "return hi > j0 && lo < j0 + bn;",
     PAIR_CPU_T),
    ("cpu_pw_log1p_ln2_lo", CPU_PAIR, "  y = y + k * -2.12194440e-4f;\n", "", PAIR_CPU_T),
    # ---- C++ CPU cross-correlation: the symmetric tiled forward's mirror tiles; the Gram
    # backward's column chunks
    ("cpu_xc_sym_mirror_once", CPU_XC, "offdiag += (same && e0 != d0) ? 2.0 * s : s;", "offdiag += s;", XC_CPU_T),
    ("cpu_xc_gram_chunk_w", CPU_XC, "static_cast<double>(py[i * d + d0 + j]) * pw[d0 + j];",
     "static_cast<double>(py[i * d + d0 + j]) * pw[j];", XC_CPU_T),
    # ---- CUDA cross-correlation (emulated): the sum-of-squares tile's diagonal, the diag's
    # row chunks, the column panels' diagonal (db)
    ("cu_xc_sumsq_tile_shift", TILE_MMA, "const int64_t shift = p.diag_shift - (r0 - c0);",
     "const int64_t shift = p.diag_shift;", XC_CUDA_T),
    ("cu_xc_diag_chunks", XC_CU, "parts[static_cast<int64_t>(blockIdx.y) * d + col] = tot;",
     "parts[col] = tot;", XC_CUDA_T),
    ("cu_xc_colpanel_sign", XC_CU, "      g.diag_shift = lo;  // d = r == e = c + lo\n",
     "      g.diag_shift = -lo;\n", XC_CUDA_T),
    # ---- pairwise: Triton's dbias partials of a column split, the float16 dq unscaling;
    # CUDA's positive-pair sigmoid, the positive pair without labels (j == i + diag_offset)
    ("pw_dbias_split_part", PAIR_PY, "part = split * tl.num_programs(0) + pid", "part = pid", PAIR_T),
    ("pw_dq_half_unscale", PAIR_PY, "        if SCALE_DS:\n            dq = dq / ds_c\n", "", PAIR_T),
    ("cu_pw_pos_sigmoid", TILES, "ds = (positive ? -I.g : I.g) / (1.f + __expf(positive ? x : -x));",
     "ds = (positive ? -I.g : I.g) / (1.f + __expf(-x));", PAIR_CUDA_T),
    ("cu_pw_pos_no_offset", TILES, "positive = has_labels ? (I.lab == J.lab) : (j == i + diag);",
     "positive = has_labels ? (I.lab == J.lab) : (j == i);", PAIR_CUDA_T),
    # ---- Python glue: distributed (gloo, world sizes 1-3)
    # the ring's backward recomputes each block's partials: an off-by-one in which block is the own one
    ("py_ring_bwd_own_block", DIST, "src = (d.rank - step) % d.world\n            with torch.enable_grad():",
     "src = (d.rank - step + 1) % d.world\n            with torch.enable_grad():",
     _dist_t("loss/nt_xent/ring/ or loss/clip_loss/ring/")),
    # the ring backward's upstream gradient of an lse partial is g exp(p - L): the softmax weight dropped
    ("py_ring_bwd_no_lse_weight", DIST, "                        g = g * w\n", "",
     _dist_t("loss/clip_loss/ring/ or loss/nt_xent/ring/")),
    # the ring merges "sum" partials (SupCon's positive sums / counts, SigLIP's totals) by logaddexp
    ("py_ring_merge_sums_as_lse", DIST, 'torch.logaddexp(a, p) if k == "lse" else a + p',
     "torch.logaddexp(a, p)", _dist_t("loss/supcon_loss/ring/ or loss/siglip_loss/ring/")),
    # gather mode: the own block's offset counted in query rows instead of key rows (M > N keys)
    ("py_gather_own_offset_rows", DIST, "glob, d.rank * block[0].shape[0]))",
     "glob, d.rank * local[0].shape[0]))", _dist_t("loss/info_nce")),
    # the autograd all-gather's backward on gloo: the gradient not summed over ranks
    ("py_allgather_bwd_no_sum", DIST, "            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=d.group)\n",
     "", _dist_t("loss/clip_loss/gather/")),
    # the autograd all-reduce's backward: the gradient not summed over ranks
    ("py_allreduce_bwd_no_sum", DIST, "        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.dctx.group)\n",
     "", _dist_t("loss/barlow_twins or loss/vicreg")),
    # Barlow Twins / VICReg centred on the local mean instead of the global batch mean
    ("py_global_center_local", DIST, "return z - _all_reduce(z.sum(0), d) / n_glob", "return z - z.mean(0)",
     _dist_t("loss/barlow_twins or loss/vicreg")),
    # NT-Xent's positive index not offset by the rank's rows in the global batch
    ("py_ntx_pos_no_rank_offset", DIST, "**kw, pos_index=p + own, diag_offset=own,",
     "**kw, pos_index=p, diag_offset=own,", _dist_t("loss/nt_xent")),
    # CLIP (open_clip local_loss): the image direction's labels not offset by rank * N
    ("py_clip_label_no_rank_offset", DIST,
     "fam.lse(be, loc[0], blk[1], loc[2], diag_offset=own, mask_mode=LSE_TARGET)[0],",
     "fam.lse(be, loc[0], blk[1], loc[2], diag_offset=0, mask_mode=LSE_TARGET)[0],",
     _dist_t("loss/clip_loss or open_clip.ClipLoss")),
    # SupCon's normalizer: the local anchor count times the world size, not the global count
    ("py_supcon_local_count", DIST,
     "total = _all_reduce(has.sum().to(torch.float64), d)\n        return torch.where(has, row,",
     "total = has.sum().to(torch.float64) * d.world\n        return torch.where(has, row,",
     _dist_t("loss/supcon_loss")),
    # SupCon's ring, a single-positive anchor as the merged LSE minus its positive (the cancelling form)
    ("py_supcon_ring_single_cancels", DIST,
     "single = torch.logaddexp(torch.where(one, rel, zero), torch.where(one, free - xp, zero))",
     "single = torch.logaddexp(torch.where(one, free, zero), torch.where(one, held_lse, zero)) - xp",
     _dist_t("loss/supcon_loss_confident/ring/")),
    # SupCon's blocks: the anchor's own pair left among its positives' logits (counted out, summed in)
    ("py_supcon_block_self_in_posdot", DIST,
     "            posdot = posdot - (xh * k_hat[own:own + xq.shape[0]]).sum(1)\n", "",
     _dist_t("loss/supcon_loss")),
    # SigLIP's ring: a foreign text block scored with positives on its diagonal
    ("py_siglip_ring_foreign_pos", DIST, "neg = negative_only or own is None", "neg = negative_only",
     _dist_t("loss/siglip_loss")),
    # DCLW: the weights 2 - N softmax with the local N instead of the global batch
    ("py_dclw_local_n", DIST, "(2 - z1.shape[0] * d.world * torch.exp(", "(2 - z1.shape[0] * torch.exp(",
     _dist_t("loss/dcl_loss")),
    # HCL: the local negative count instead of the global 2 W N - 2
    ("py_hcl_local_n_neg", DIST, "n_neg = n2 * d.world - 2", "n_neg = n2 - 2", _dist_t("loss/hard_negative")),
    # uniformity: normalized by the local n(n-1)
    ("py_uniformity_local_n", DIST, "n = x.shape[0] * d.world\n", "n = x.shape[0]\n", _dist_t("loss/uniformity")),
    # ---- Python glue: functional (the single-process losses on the C++ CPU backend)
    ("py_clip_sum_directions", FUNC, "loss = 0.5 * (row.mean() + col.mean())\n    if isinstance(logit_bias",
     "loss = row.mean() + col.mean()\n    if isinstance(logit_bias", _py_t("test_formulas.py", k="clip")),
    ("py_siglip_negative_only_ignored", FUNC, "mode=PAIR_NEGATIVE_ONLY if negative_only else 0)\n    return total",
     "mode=0)\n    return total", _py_t("test_formulas.py", "test_siglip.py", k="siglip")),
    # DCLW: the von Mises-Fisher weights not detached (gradient through the weights)
    ("py_dclw_weights_not_detached", FUNC, "cos = _rowdot(z1, z2).detach()", "cos = _rowdot(z1, z2)",
     _py_t("test_formulas.py", k="dcl")),
    # HCL: the clamp floor N e^{-1/t} without the N (log space: log(n_neg) - inv_t)
    ("py_hcl_clamp_floor_no_n", FUNC, "torch.maximum(d, (math.log(n_neg) - inv_t) - log_pos)",
     "torch.maximum(d, -inv_t - log_pos)", _py_t("test_formulas.py", k="hard_negative")),
    # HCL: the debiasing term tau_plus * Nneg * pos without Nneg
    ("py_hcl_tau_plus_no_n", FUNC, "    a = tau_plus * n_neg\n", "    a = tau_plus\n",
     _py_t("test_formulas.py", k="hard_negative")),
    # HCL's rows as an LSE minus the positive logit (the form before session 26): a confident row
    # keeps an ulp of the logits' ~20 of its 1e-8 .. 1e-15
    ("py_hcl_lse_minus_pos", FUNC, "    return reference._softplus_nonfinite_nan(d)\n",
     "    return torch.logaddexp(log_pos, d + log_pos) - log_pos\n",
     _py_t("test_lse_family.py", k="confident_rows_outside and hcl")),
    # MoCo (the positive and a queue) as LSE(pos, queue) - pos, not softplus(LSE(queue) - pos)
    ("py_moco_lse_minus_pos", FUNC,
     "return reference._reduce(reference._softplus_nonfinite_nan(negatives_lse() - pos), reduction)",
     "return reference._reduce(torch.logaddexp(pos, negatives_lse()) - pos, reduction)",
     _py_t("test_lse_family.py", k="confident_rows_outside and moco")),
    ("py_moco_ring_lse_minus_pos", DIST,
     "return _reduce_rows(rest if decoupled else reference._softplus_nonfinite_nan(rest), reduction, d)",
     "return _reduce_rows(rest if decoupled else torch.logaddexp(pos, rest + pos) - pos, reduction, d)",
     _dist_t("loss/info_nce_moco_confident")),
    # uniformity: the mean over n^2 pairs instead of the n(n-1) off-diagonal ones
    ("py_uniformity_n_squared", FUNC, "dim=0) - math.log(n * (n - 1))\n\n\n@_amp_boundary()\ndef alignment_loss",
     "dim=0) - math.log(n * n)\n\n\n@_amp_boundary()\ndef alignment_loss", _py_t("test_formulas.py", k="uniformity")),
    # VICReg: the biased variance (N) in x's hinge instead of the unbiased N - 1
    ("py_vicreg_var_biased", FUNC, "torch.sqrt(xc.var(0) + eps)", "torch.sqrt(xc.var(0, unbiased=False) + eps)",
     _py_t("test_formulas.py", "test_barlow_vicreg.py", k="vicreg")),
    # Barlow Twins: lambda on the diagonal term instead of the off-diagonal one
    ("py_barlow_lambda_on_diag", FUNC, "return (diag / n - 1).pow(2).sum() + lambd * off / (n * n)",
     "return lambd * (diag / n - 1).pow(2).sum() + off / (n * n)",
     _py_t("test_formulas.py", "test_barlow_vicreg.py", k="barlow")),
    # ---- Python glue: the memory bank and the compat layers
    # MemoryBank: the query returns the bank itself, not a copy, so the in-place update that follows
    # shows through (the queue read after the update: the batch's own rows among its negatives)
    ("py_bank_query_not_copied", NN_PY, "        out = self.bank.clone()\n", "        out = self.bank\n",
     _py_t("test_nn.py", "test_compat.py", k="memory_bank")),
    # lightly NT-Xent: the bank updated also when out0 does not require grad (eval steps)
    ("py_lightly_bank_update_no_grad", LIGHTLY, "query_and_update(out1, update=out0.requires_grad)",
     "query_and_update(out1, update=True)", _py_t("test_compat.py", k="memory_bank")),
    # lightly Barlow Twins, gather_distributed: C all-reduced outside autograd (lightly <= 1.5.25;
    # 1.6 sums the ranks' gradients of C through the all-reduce)
    ("py_lightly_barlow_allreduce_no_grad", LIGHTLY,
     "c = _dist().all_reduce_with_grad(a.T @ b / (z_a.shape[0] * w))",
     "c = a.T @ b / (z_a.shape[0] * w); c = c + (_dist().all_reduce_with_grad(c.detach()) - c.detach())",
     _dist_t("lightly.BarlowTwinsLoss")),
    # open_clip SigLipLoss: the bias passed with the wrong sign
    ("py_open_clip_siglip_bias_sign", OPEN_CLIP, "bias = 0.0 if logit_bias is None else logit_bias",
     "bias = 0.0 if logit_bias is None else -logit_bias", _py_t("test_compat.py", k="open_clip_siglip")),
    # open_clip ClipLoss(local_loss=False, gather_with_grad=False): this rank's slice at rank 0's place
    ("py_gather_features_local_slot", DIST, "        parts[d.rank] = x\n", "        parts[0] = x\n",
     _dist_t("open_clip.ClipLoss")),
    # PML's mined SupCon: an anchor with one positive pair as s_p - LSE(s_p, negatives) (the cancelling form)
    ("py_pml_mined_supcon_one_positive_cancels", PML,
     "torch.where((count == 1)[pa], torch.nn.functional.logsigmoid(s[:n_pos] - neg_lse),\n"
     "                               s[:n_pos] - lse)", "s[:n_pos] - lse",
     _py_t("test_compat.py", k="one_positive_confident")),
    # PML with a miner's pairs: an empty segment's log-sum-exp 0 instead of -inf (an anchor with
    # positives and no negative pair then has a non-zero NT-Xent term)
    ("py_pml_segment_lse_empty_zero", PML, "                       torch.full_like(top, -math.inf))",
     "                       torch.zeros_like(top))", _py_t("test_compat.py", k="pml and miner")),
    # _PairDots backward: every chunk takes the first chunk's upstream gradient
    ("py_pml_pairdots_bwd_chunk", PML, "gs = g[s:s + step, None]", "gs = g[:step, None]",
     _py_t("test_compat.py", k="pml and miner")),
    # _PairDots with y is x: both terms already summed in dx, returned for both inputs (counted twice)
    ("py_pml_pairdots_same_twice", PML, "return dx, None, None, None  # (one tensor",
     "return dx, dx, None, None  # (one tensor",
     _py_t("test_compat.py", k="pml and miner")),
    # index_sum (label-group sums, PML's pair lists): index_add, whose CUDA adds are atomics in
    # no fixed order (a CPU run gives the same numbers: only the source scan can see it)
    ("py_index_sum_atomic_order", FAM_PY, ".index_put((index,), src, accumulate=True)", ".index_add(0, index, src)",
     _py_t("test_determinism.py")),
    # index_sum without accumulate: a repeated index keeps one of its values
    ("py_index_sum_no_accumulate", FAM_PY, ".index_put((index,), src, accumulate=True)",
     ".index_put((index,), src, accumulate=False)", _py_t("test_determinism.py")),
    # _PairDots backward: an anchor in several pairs keeps one pair's gradient
    ("py_pml_pairdots_bwd_no_accumulate", PML, "dx.index_put_((ii,), gs * y[jj], accumulate=True)",
     "dx.index_put_((ii,), gs * y[jj], accumulate=False)", _py_t("test_compat.py", k="pml and miner")),
    # reference HCL in log space: the clamp's floor without the temperature (Nneg e^0)
    ("py_ref_hcl_floor_no_t", "reference.py",
     "log_floor = math.log(n_neg) - 1 / torch.as_tensor(temperature, dtype=gap.dtype, device=gap.device)",
     "log_floor = math.log(n_neg) + 0 * torch.as_tensor(temperature, dtype=gap.dtype, device=gap.device)",
     _py_t("test_formulas.py", k="hard_negative or hcl")),
    # reference HCL: a NaN gap (non-finite input) taken as "clamped", a finite floor
    ("py_ref_hcl_nan_clamped", "reference.py", "    ok = ~(gap >= 0)\n", "    ok = gap < 0\n",
     _py_t("test_nonfinite.py", k="hard_negative or hcl")),
    # uniformity on offset features: no translation before the kernels' expansion
    ("py_uniformity_no_shift", FUNC, "    x = x - _exact_shift(x, x.detach().double().mean(0))\n", "",
     _py_t("test_lse_family.py", k="uniformity_offset")),
    # 16-bit: the mean subtracted on every column, rounding x - c (not a translation)
    ("py_exact_shift_rounds_16bit", FUNC, "    if x.dtype not in (torch.float16, torch.bfloat16):\n        return c\n",
     "    return c\n", _py_t("test_lse_family.py", k="uniformity")),
    # distributed uniformity: each rank shifted by its own mean (distances across ranks change)
    ("py_uniformity_local_shift", DIST,
     "    x = x - functional._exact_shift(x, center, lambda ok: _all_reduce((~ok).double(), d) == 0)\n",
     "    x = x - functional._exact_shift(x, x.detach().double().mean(0))\n", _dist_t("uniformity_loss_offset")),
    # PML's SumReducer taken as MeanReducer
    ("py_pml_sum_reducer_mean", PML, "            return terms.sum()\n", "            return terms.mean()\n",
     _py_t("test_compat.py", k="pml and reducers")),
    # DotProductSimilarity(normalize_embeddings=False) normalizing anyway
    ("py_pml_raw_dot_normalized", PML, "normalize = bool(distance.normalize_embeddings)", "normalize = True",
     _py_t("test_compat.py", k="pml and reducers")),
    # NT-Xent: an anchor without negatives keeps its positive pairs in the sum (softplus(0 - s))
    ("py_pml_lone_anchor_pairs_kept", PML, "pos_id = torch.where(has_neg, lab_id, torch.full_like(lab_id, -1))",
     "pos_id = lab_id", _py_t("test_compat.py", k="pml")),
    # NT-Xent: a NaN in an anchor without negatives dropped with its zero terms
    ("py_pml_lone_anchor_nan_dropped", PML, "torch.where(lone[:, None], xh.float(), 0.0).mul(0).sum()",
     "torch.zeros((), device=xh.device)",
     _py_t("test_compat.py", k="pml")),
    # mined SupCon: the positive pairs not deduplicated (PML's masks make them sets)
    # uniformity's row side: x_i times the exact row weight (autograd's sum_j w_ij) instead of the
    # product's own sum of its rounded weights (the CUDA kernels round dS to 16 bits)
    ("py_sqdist_exact_row_weights", FAM_PY, "gq = dq[:, :d] - qa[:, :d].float() * dq[:, d:d + 1] if nq else None",
     "gq = dq[:, :d] - qa[:, :d].float() * g.float()[:, None] if nq else None",
     _py_t("test_lse_family.py", k="cuda and on_a_line"), EMU),
    # the normalization's radial part from dx rounded to the input dtype (not the dx it is removed from)
    ("py_fold_norm_rounded_radial", FAM_PY, "(xf * dx).sum(1) * r * r", "(xf * dx.to(x.dtype).float()).sum(1) * r * r",
     _py_t("test_lse_family.py", k="cpu and gradient_is_zero")),
    # the lse op given q as it comes (strides, storage offset): the CUDA kernels read rows by D
    ("py_lse_q_not_contiguous", FAM_PY, 'row, col = _op("lse", backend, q)(q.contiguous(), k.contiguous(),',
     'row, col = _op("lse", backend, q)(q, k.contiguous(),', _py_t("test_layouts.py", k="cuda"), EMU),
    ("py_pml_supcon_pairs_not_dedup", PML, "pos_key = torch.unique(a1 * m + p)", "pos_key = a1 * m + p",
     _py_t("test_compat.py", k="pml and miner")),
]


def kind(path: str) -> str:
    """triton: kernels/*.py; py: any other .py (the package's glue, relative to
    python/contrastive_kernels/); cuda: csrc/cuda/*; cpu: the other C++ sources."""
    if path.endswith(".py"):
        return "triton" if path.startswith("kernels/") else "py"
    return "cuda" if "/cuda/" in path else "cpu"


NATIVE = ("cuda", "cpu")  # the kinds that edit and rebuild the build tree


def _pytest(pythonpath: str, tests, env_extra, unset=()) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", **env_extra)
    for k in unset:
        env.pop(k, None)
    marker = "not slow"
    if tests[0] == "-m":  # (pytest keeps the last -m: the kind's marker and "not slow" in one)
        marker, tests = f"{tests[1]} and not slow", tests[2:]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", marker] + tests
    r = subprocess.run(cmd, cwd=tempfile.gettempdir(), env=env, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    return dict(killed=r.returncode != 0, rc=r.returncode, tail=lines[-1] if lines else r.stderr[-300:],
                failed=[ln for ln in lines if ln.startswith("FAILED")][:2])


def _edit(path: str, old: str, new: str, name: str) -> str:
    src = open(path).read()
    if src.count(old) != 1:
        raise SystemExit(f"{name}: the edit's text occurs {src.count(old)} times in {path} (the source moved: "
                         "update the mutant)")
    open(path, "w").write(src.replace(old, new))
    return src


def run_copied(name, rel, old, new, tests, env) -> dict:
    """A Triton or Python-glue mutant: copy python/ (the built extensions included) and
    kernels/ into a temporary tree, edit python/contrastive_kernels/<rel> there, run the tests
    on it.  Triton: under TRITON_INTERPRET=1; py: without it (the C++ CPU backend), the
    Triton-marked tests left out."""
    root = tempfile.mkdtemp(prefix=f"mut_{name}_")
    try:
        shutil.copytree(os.path.join(REPO, "python"), os.path.join(root, "python"), symlinks=True,
                        ignore=shutil.ignore_patterns("kernels", "__pycache__"))
        shutil.copytree(os.path.join(REPO, "kernels"), os.path.join(root, "python", "contrastive_kernels", "kernels"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        _edit(os.path.join(root, "python", "contrastive_kernels", rel), old, new, name)
        if kind(rel) == "triton":
            return _pytest(os.path.join(root, "python"), tests, dict(env, TRITON_INTERPRET="1"))
        if tests[0] != "-m":
            tests = ["-m", "not triton"] + list(tests)
        return _pytest(os.path.join(root, "python"), tests, dict(env), unset=("TRITON_INTERPRET",))
    finally:
        shutil.rmtree(root, ignore_errors=True)


run_triton = run_copied  # (the name of earlier versions)


def _build(tree: str) -> None:
    r = subprocess.run([sys.executable, "setup.py", "build_ext"], cwd=tree, capture_output=True, text=True,
                       env=dict(os.environ, CONTRASTIVE_KERNELS_BUILD_CUDA_EMU="1",
                                MAX_JOBS=os.environ.get("MAX_JOBS", "1")))
    if r.returncode != 0:
        raise RuntimeError("build failed:\n" + r.stdout[-2000:] + r.stderr[-2000:])
    for so in glob.glob(os.path.join(tree, "build", "lib*", "contrastive_kernels", "*.so")):
        dst = os.path.join(tree, "python", "contrastive_kernels", os.path.basename(so))
        if os.path.exists(dst):
            os.remove(dst)
        shutil.copy(so, dst)


def run_native(tree, name, rel, old, new, tests, env) -> dict:
    path = os.path.join(tree, rel)
    orig = _edit(path, old, new, name)
    try:
        try:
            _build(tree)
        except RuntimeError as exc:  # a mutant that does not compile tests nothing: fix the mutant
            return dict(killed=None, rc=None, tail="the mutant does not build", failed=[str(exc)[-600:]])
        extra = dict(env)
        if kind(rel) == "cuda":
            extra["CONTRASTIVE_KERNELS_CUDA_EMULATE"] = "1"
        return _pytest(os.path.join(tree, "python"), tests, extra)
    finally:
        open(path, "w").write(orig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--kind", choices=["triton", "py", "cuda", "cpu"])
    ap.add_argument("--out", default="mutation_audit.jsonl")
    ap.add_argument("--build-tree", default=os.path.join(tempfile.gettempdir(), "ck_mutation_tree"))
    a = ap.parse_args()
    only = set(filter(None, a.only.split(",")))
    unknown = only - {m[0] for m in MUTANTS}
    if unknown:
        raise SystemExit(f"--only: unknown mutant(s) {sorted(unknown)}; see --list")
    todo = [m for m in MUTANTS if (not only or m[0] in only) and (a.kind is None or kind(m[1]) == a.kind)]
    if a.list:
        for m in todo:
            print(f"{m[0]:32s} {kind(m[1]):7s} {m[1]}")
        return
    native = any(kind(m[1]) in NATIVE for m in todo)
    if native and not os.path.isdir(a.build_tree):
        subprocess.run(["git", "clone", "-q", REPO, a.build_tree], check=True)
        os.symlink("../../kernels", os.path.join(a.build_tree, "python", "contrastive_kernels", "kernels"))
    elif native:  # a tree from an earlier run: the checkout's committed HEAD, not the sources of then
        subprocess.run(["git", "-C", a.build_tree, "fetch", "-q", REPO, "HEAD"], check=True)
        subprocess.run(["git", "-C", a.build_tree, "reset", "-q", "--hard", "FETCH_HEAD"], check=True)
    survived, invalid = [], []
    for m in todo:
        name, rel, old, new, tests = m[:5]
        env = m[5] if len(m) > 5 else {}
        t0 = time.time()
        if kind(rel) not in NATIVE:
            rec = run_copied(name, rel, old, new, tests, env)
        else:
            rec = run_native(a.build_tree, name, rel, old, new, tests, env)
        rec = dict(name=name, kind=kind(rel), secs=round(time.time() - t0), **rec)
        print(json.dumps(rec), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if rec["killed"] is None:
            invalid.append(name)
        elif not rec["killed"]:
            survived.append(name)
    if native:
        _build(a.build_tree)  # (the tree's extensions as the checkout's again)
    print(f"{len(todo) - len(survived) - len(invalid)} of {len(todo)} mutants killed" +
          (f"; survived: {', '.join(survived)}" if survived else "") +
          (f"; did not build: {', '.join(invalid)}" if invalid else ""))
    sys.exit(1 if survived or invalid else 0)


if __name__ == "__main__":
    main()
