"""Multi-process tests of contrastive_kernels.distributed: real processes on gloo (CPU),
world sizes 1, 2 and 3.

Each world size is launched once (tests/_dist_worker.py runs every case in the same
processes and writes its measurements); the tests below assert on them:
  * the mean over ranks of the rank losses equals the single-process loss of the
    global batch (float64 reference);
  * every rank's input gradient equals world_size x the global gradient of its rows;
  * replicated scalars / a replicated queue: the mean over ranks of their gradients
    equals the global gradient;
  * an nn.Linear wrapped in DistributedDataParallel gets exactly the single-process
    parameter gradients;
  * unequal local batches raise ValueError naming every rank's size;
  * a mode used without a process group raises a clear error.
The reference backend is checked in float64 (tolerance 1e-9: the observed errors are
rounding, ~1e-16), every kernel backend available here in float32 (SPEC tolerance 1e-5).
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import contrastive_kernels as ck
from contrastive_kernels import distributed as ckd

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402
from helpers import kernel_backends, skip_interpreter_bf16  # noqa: E402

pytestmark = pytest.mark.distributed

BACKENDS = ["reference"] + sorted(set(kernel_backends("lse") + kernel_backends("pairwise") + kernel_backends("xcorr")))
WORLDS = (1, 2, 3)
TOL = {"float64": 1e-9, "float32": 1e-5}
WORKER = os.path.join(os.path.dirname(__file__), "_dist_worker.py")

_RUNS: dict[int, dict] = {}


def _launch(world: int, tmp_root) -> dict:
    """Run `world` ranks of the worker; return {rank: results}."""
    d = tmp_root / f"world{world}"
    d.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), str(world), str(d / "init"), str(d),
                               ",".join(BACKENDS)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(p.returncode != 0 for p in procs):
        raise AssertionError(f"world {world}: a rank failed:\n" + "\n---\n".join(logs[-2:]))
    return {r: json.loads((d / f"rank{r}.json").read_text()) for r in range(world)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")

    def get(world):
        if world not in _RUNS:
            _RUNS[world] = _launch(world, root)
        return _RUNS[world]
    return get


def _check(res, world, key):
    tol = TOL[key.rsplit("-", 1)[1]]
    for rank in range(world):
        rec = res[rank].get(key)
        assert rec is not None, f"rank {rank} produced no result for {key}"
        assert "exception" not in rec, f"rank {rank}, {key}:\n{rec.get('exception')}"
        bad = {k: v for k, v in rec["errs"].items() if not v <= tol}
        assert not bad, f"rank {rank}, {key}: relative errors above {tol:g}: {bad}"
        assert rec["errs"], f"rank {rank}, {key}: nothing was compared"


LOSS_KEYS = [k for k in W.case_keys(BACKENDS, 2) if k.startswith("loss/")]
DDP_KEYS = [k for k in W.case_keys(BACKENDS, 2) if k.startswith("ddp/")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("key", LOSS_KEYS)
def test_loss_and_gradients_match_global_batch(run, world, key):
    _check(run(world), world, key)


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("key", DDP_KEYS)
def test_ddp_parameter_gradients_match_single_process(run, world, key):
    _check(run(world), world, key)


NONFINITE_KEYS = [k for k in W.case_keys(BACKENDS, 2) if k.startswith("nonfinite/")]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("key", NONFINITE_KEYS)
def test_non_finite_input_on_one_rank(run, world, key):
    """An infinite feature in one rank's rows: every rank's loss is non-finite, since each
    rank's anchors meet it among their keys (a -inf logit, never a dropped exp(-inf) term)."""
    for rank in range(world):
        rec = run(world)[rank].get(key)
        assert rec is not None and "exception" not in rec, f"rank {rank}, {key}: {rec}"
        assert not math.isfinite(rec["errs"]["loss"]), f"rank {rank}, {key}: finite loss {rec['errs']['loss']}"


CONFIDENT_KEYS = [k for k in W.case_keys(BACKENDS, 2) if k.startswith("confident/")]
# Measured on 2 and 3 ranks (cpu backend, emulated cuda): 1.0-2.4x in both modes; the ring
# was 3.6-5.4x while its own block's target gradient was formed outside the kernel.  HCL
# 1.4-2.1x (cpu), 1.6-2.8x (emulated cuda; its kernels round each op's dS to 16 bits): it was up
# to 4.2x while autograd added its two log-sum-exps' gradients rounded (fam.lse_two_scales).
CONFIDENT_FLOOR_MULTIPLE = 3.0


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("key", CONFIDENT_KEYS)
def test_bfloat16_gradients_on_confident_rows(run, world, key):
    """bf16, mean loss ~0.3: every input gradient within a few roundings of the exact one,
    in both modes (the target's p - 1 formed in float32 inside the kernels)."""
    if key.split("/")[3].startswith("triton"):
        skip_interpreter_bf16("triton", torch.bfloat16)
    for rank in range(world):
        rec = run(world)[rank].get(key)
        assert rec is not None and "exception" not in rec, f"rank {rank}, {key}: {rec}"
        assert set(rec["errs"]) == {"dx/floor", "dy/floor"}
        bad = {k: v for k, v in rec["errs"].items() if not v <= CONFIDENT_FLOOR_MULTIPLE}
        assert not bad, f"rank {rank}, {key}: gradient error above {CONFIDENT_FLOOR_MULTIPLE}x the floor: {bad}"


AUTOCAST_KEYS = [k for k in W.case_keys(BACKENDS, 2) if k.startswith("autocast/")]


@pytest.mark.parametrize("world", (1, 2, 3))
@pytest.mark.parametrize("key", AUTOCAST_KEYS)
def test_autocast_casts_the_embeddings(run, world, key):
    """Inside a float16 autocast region, float32 local batches give exactly the loss and
    (float32) gradients of the same call on float16 inputs, in both modes."""
    for rank in range(world):
        rec = run(world)[rank].get(key)
        assert rec is not None and "exception" not in rec, f"rank {rank}, {key}: {rec}"
        assert rec["errs"] and all(v == 0 for v in rec["errs"].values()), f"rank {rank}, {key}: {rec['errs']}"


MODULE_KEYS = [f"compat/{c}-float32" for c in W.COMPAT_CASES] + [
    f"nn/{c[0]}/{m}-float64" for c in W.NN_CASES for m in W.MODES]


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("key", MODULE_KEYS)
def test_modules_match(run, world, key):
    """nn modules with distributed=: the rule against the module on the global batch.
    compat modules: each rank's loss and gradients equal the original library's
    distributed computation on that rank: written out in _dist_worker.py, and for open_clip also
    open_clip's own loss.py ("real open_clip.*", float64)."""
    _check(run(world), world, key)


def test_nn_modules_and_compat_cover_the_issue():
    assert {c[0] for c in W.NN_CASES} == {"InfoNCELoss", "NTXentLoss", "ClipLoss", "SigLipLoss", "SupConLoss",
                                         "DCLLoss", "DCLWLoss", "HardNegativeLoss", "UniformityLoss",
                                         "BarlowTwinsLoss", "VICRegLoss"}
    assert {c.split(":")[0] for c in W.COMPAT_CASES} == {
        "open_clip.ClipLoss", "open_clip.SigLipLoss", "real open_clip.ClipLoss", "real open_clip.SigLipLoss",
        "lightly.NTXentLoss", "lightly.DCLLoss", "lightly.DCLWLoss",
        "lightly.BarlowTwinsLoss", "lightly.VICRegLoss"}


def test_every_loss_and_mode_is_covered():
    fnames = {f for _, f, _ in W.LOSS_CASES}
    assert fnames == {"info_nce", "nt_xent", "clip_loss", "siglip_loss", "supcon_loss", "dcl_loss",
                      "hard_negative_loss", "uniformity_loss", "barlow_twins_loss", "vicreg_loss"}
    assert set(W.NONFINITE_CASES) == fnames
    for f in fnames:
        for mode in ckd.MODES:
            assert any(k.split("/")[2] == mode and k.split("/")[1].startswith(f.replace("_loss", ""))
                       for k in LOSS_KEYS)


@pytest.mark.parametrize("world", (2, 3))
@pytest.mark.parametrize("fname", [f for f, _ in W.DDP_CASES])
def test_unequal_local_batches_rejected(run, world, fname):
    res = run(world)
    for rank in range(world):
        rec = res[rank][f"uneven/{fname}"]
        assert rec["raised"] == "ValueError", f"rank {rank}: {rec}"
        msg = rec["message"]
        for r in range(world):  # every rank's size is named
            assert f"rank {r}:" in msg and f"({W.N + r}, {W.D})" in msg, msg


@pytest.mark.parametrize("fname", W.TOO_SMALL)
def test_global_batch_of_one_row_rejected(run, fname):
    rec = run(1)[0][f"too_small/{fname}"]
    assert rec["raised"] == "ValueError", rec
    assert "at least 2" in rec["message"] and "global batch" in rec["message"] and f"(1, {W.D})" in rec["message"]


@pytest.mark.parametrize("world", (2, 3))
def test_compat_barlow_local_batch_of_one_row_rejected(run, world):
    for rank in range(world):
        rec = run(world)[rank]["one_row/compat/lightly.BarlowTwinsLoss"]
        assert rec["raised"] == "ValueError", f"rank {rank}: {rec}"
        assert "z_a needs at least 2 rows on every rank" in rec["message"] and f"(1, {W.D})" in rec["message"]


FN_ARGS = {
    "info_nce": lambda x: dict(query=x, key=x),
    "nt_xent": lambda x: dict(z1=x, z2=x),
    "clip_loss": lambda x: dict(image=x, text=x, logit_scale=1.0),
    "siglip_loss": lambda x: dict(image=x, text=x, logit_scale=1.0, logit_bias=0.0),
    "supcon_loss": lambda x: dict(embeddings=x, labels=torch.zeros(x.shape[0], dtype=torch.long)),
    "dcl_loss": lambda x: dict(z1=x, z2=x),
    "hard_negative_loss": lambda x: dict(z1=x, z2=x),
    "uniformity_loss": lambda x: dict(x=x),
    "barlow_twins_loss": lambda x: dict(z1=x, z2=x),
    "vicreg_loss": lambda x: dict(z1=x, z2=x),
}


@pytest.mark.parametrize("mode", ckd.MODES)
@pytest.mark.parametrize("fname", sorted(FN_ARGS))
def test_without_process_group_clear_error(fname, mode):
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        getattr(ckd, fname)(**FN_ARGS[fname](torch.randn(4, 3)), mode=mode)


@pytest.mark.parametrize("fname", sorted(FN_ARGS))
def test_unknown_mode_rejected(fname):
    with pytest.raises(ValueError, match="mode must be one of"):
        getattr(ckd, fname)(**FN_ARGS[fname](torch.randn(4, 3)), mode="allgather")


def test_rank_loss_rule_documented():
    doc = ckd.__doc__
    assert "MEAN over ranks" in doc and "world_size x" in doc
    assert ck.distributed is ckd
