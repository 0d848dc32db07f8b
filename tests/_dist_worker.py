"""One rank of the multi-process tests of contrastive_kernels.distributed (gloo, CPU).

    python _dist_worker.py RANK WORLD INIT_FILE OUT_DIR BACKENDS   (BACKENDS: comma-separated)

Every rank builds the same global inputs (seeded per case), computes the
single-process loss of the global batch with the float64 reference and its
gradients, then the distributed loss of its own slice, and records the relative
errors of
  * the mean over ranks of the rank losses against the global loss,
  * each rank's input gradient against world_size x the global gradient of its rows,
  * the mean over ranks of the gradients of replicated tensors (temperature,
    logit_scale, logit_bias, a replicated negatives queue) against the global ones,
  * for a tiny nn.Linear wrapped in DistributedDataParallel, each parameter's
    gradient after DDP's averaging against the single-process gradient,
  * in bfloat16 on confident rows, each input gradient's error as a multiple of the
    error of the exact gradient rounded once to bfloat16,
and the error cases (unequal local batches).  Results go to OUT_DIR/rank<R>.json;
tests/test_distributed.py asserts on them.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import traceback
import zlib

import torch
import torch.distributed as dist

import contrastive_kernels as ck
from contrastive_kernels import _peers  # (open_clip's own loss.py, loaded by path)
from contrastive_kernels import distributed as ckd
from helpers import confident_pairs, interpreter_bf16_broken  # (tests/ is on sys.path: the script's folder)

torch.set_num_threads(1)


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    # a gradient that is zero in exact arithmetic (a bias that cancels) is compared absolutely
    return diff if denom < 1e-12 else diff / denom


# ------------------------------------------------------------------------ cases
# A case: (name, function name, builder).  builder(g, W, dtype) returns
#   split:  {arg: global tensor} split by rows across ranks (equal parts)
#   shared: {arg: tensor} replicated on every rank (floating ones get gradients)
#   kw:     keyword arguments of both calls
#   gkw:    function(W, split) -> extra keyword arguments of the global call only
#   dkw:    extra keyword arguments of the distributed call only
def _f(g, rows, dim, dtype):
    return torch.randn(rows, dim, generator=g, dtype=torch.float64).to(dtype)


def _scalar(v, dtype):
    return torch.tensor(v, dtype=torch.float64).to(torch.float32 if dtype != torch.float64 else dtype)


N, D = 3, 5


def _info(**kw):
    def build(g, W, dt):
        split = {"query": _f(g, W * N, D, dt), "key": _f(g, W * N, D, dt)}
        return split, {"temperature": _scalar(0.3, dt)}, kw, None, {}
    return build


def _info_m_gt_n(g, W, dt):
    m = N + 2
    split = {"query": _f(g, W * N, D, dt), "key": _f(g, W * m, D, dt),
             "positive_index": torch.randint(0, m, (W * N,), generator=g)}

    def gkw(W, s):  # local positive indices refer to local keys: global index rank * m + p
        off = torch.arange(W).repeat_interleave(N) * m
        return {"positive_index": s["positive_index"] + off}
    return split, {"temperature": _scalar(0.2, dt)}, {"decoupled": True}, gkw, {}


def _info_negatives(in_batch):
    def build(g, W, dt):
        split = {"query": _f(g, W * N, D, dt), "key": _f(g, W * N, D, dt)}
        shared = {"negatives": _f(g, 4, D, dt), "temperature": _scalar(0.25, dt)}
        return split, shared, {"in_batch_negatives": in_batch}, None, {}
    return build


def _ntx(**kw):
    def build(g, W, dt):
        return {"z1": _f(g, W * N, D, dt), "z2": _f(g, W * N, D, dt)}, {"temperature": _scalar(0.5, dt)}, kw, None, {}
    return build


def _clip(bias):
    def build(g, W, dt):
        shared = {"logit_scale": _scalar(2.5, dt)}
        if bias:
            shared["logit_bias"] = _scalar(-1.0, dt)
        return {"image": _f(g, W * N, D, dt), "text": _f(g, W * N, D, dt)}, shared, {}, None, {}
    return build


def _siglip(**kw):
    def build(g, W, dt):
        return ({"image": _f(g, W * N, D, dt), "text": _f(g, W * N, D, dt)},
                {"logit_scale": _scalar(3.0, dt), "logit_bias": _scalar(-2.0, dt)}, kw, None, {})
    return build


def _supcon(classes, ref=False):
    def build(g, W, dt):
        split = {"embeddings": _f(g, W * N, D, dt), "labels": torch.randint(0, classes, (W * N,), generator=g)}
        if ref:
            split["ref_embeddings"] = _f(g, W * (N + 1), D, dt)
            split["ref_labels"] = torch.randint(0, classes, (W * (N + 1),), generator=g)
        return split, {"temperature": _scalar(0.2, dt)}, {}, None, {}
    return build


def _dcl(**kw):
    def build(g, W, dt):
        return {"z1": _f(g, W * N, D, dt), "z2": _f(g, W * N, D, dt)}, {"temperature": _scalar(0.4, dt)}, kw, None, {}
    return build


def _hcl(**kw):
    def build(g, W, dt):
        return {"z1": _f(g, W * N, D, dt), "z2": _f(g, W * N, D, dt)}, {"temperature": _scalar(0.5, dt)}, kw, None, {}
    return build


def _uniformity(g, W, dt):  # (t a replicated tensor: its gradient is checked too)
    return {"x": _f(g, W * N, D, dt) * 0.5}, {"t": _scalar(1.5, dt)}, {}, None, {}


def _uniformity_offset(g, W, dt):  # features around a common offset (collapsing): the kernels' expansion
    x = torch.randn(W * N, D, generator=g, dtype=torch.float64) * 0.05 + 1.0  # needs every rank's one shift
    return {"x": x.to(dt)}, {"t": _scalar(1.5, dt)}, {}, None, {}


def _xc(exchange, dim=D, **kw):
    def build(g, W, dt):
        return ({"z1": _f(g, W * N, dim, dt) + 0.5, "z2": _f(g, W * N, dim, dt) * 1.5},
                {}, kw, None, {"exchange": exchange})
    return build


D_CONFIDENT = 32  # (nearly orthogonal random rows: every row confident, not only most)


def _confident_pairs(g, W, dt, noise=0.2):
    """Unit rows and their close copies (the trained regime: at temperature 0.05 .. 0.1 the positive
    dominates, per-row losses 1e-8 .. 1e-4), so that a loss formed as an LSE minus the positive
    logit keeps only a float32 ulp of the logits' size of itself."""
    x, y = confident_pairs(W * N, D_CONFIDENT, noise, g)
    return x.to(dt), y.to(dt)


def _moco_confident(g, W, dt):
    q, k = _confident_pairs(g, W, dt)
    neg = torch.randn(6, D_CONFIDENT, generator=g, dtype=torch.float64)
    shared = {"negatives": (neg / neg.norm(dim=1, keepdim=True)).to(dt), "temperature": _scalar(0.05, dt)}
    return {"query": q, "key": k}, shared, {"in_batch_negatives": False, "normalize": False}, None, {}


def _hcl_confident(**kw):
    def build(g, W, dt):
        z1, z2 = _confident_pairs(g, W, dt)
        # (temperature 0.1: the clamped rows' ~1e-8 stays above rel_err's absolute threshold, 1e-12)
        return {"z1": z1, "z2": z2}, {"temperature": _scalar(0.1, dt)}, dict(kw, normalize=False), None, {}
    return build


def _supcon_confident(g, W, dt):
    """SimCLR-style labels (each label on a row and its close copy: one positive per anchor), the
    rows shuffled so that an anchor's positive sits in its own rank's block or another's."""
    x, y = _confident_pairs(g, W, dt)
    lab = torch.arange(W * N).repeat(2)
    perm = torch.randperm(2 * W * N, generator=g)
    return ({"embeddings": torch.cat([x, y])[perm], "labels": lab[perm]}, {"temperature": _scalar(0.05, dt)},
            {"normalize": False}, None, {})


LOSS_CASES = [
    ("info_nce", "info_nce", _info()),
    ("info_nce_nonorm_sum", "info_nce", _info(normalize=False, reduction="sum")),
    ("info_nce_decoupled", "info_nce", _info(decoupled=True)),
    ("info_nce_symmetric", "info_nce", _info(symmetric=True)),
    ("info_nce_symmetric_decoupled", "info_nce", _info(symmetric=True, decoupled=True)),
    ("info_nce_more_keys", "info_nce", _info_m_gt_n),
    ("info_nce_queue", "info_nce", _info_negatives(True)),
    ("info_nce_moco", "info_nce", _info_negatives(False)),
    ("info_nce_moco_confident", "info_nce", _moco_confident),
    ("nt_xent", "nt_xent", _ntx()),
    ("nt_xent_nonorm", "nt_xent", _ntx(normalize=False)),
    ("clip_loss", "clip_loss", _clip(False)),
    ("clip_loss_bias", "clip_loss", _clip(True)),
    ("siglip_loss", "siglip_loss", _siglip()),
    ("siglip_loss_negative_only", "siglip_loss", _siglip(negative_only=True)),
    ("supcon_loss", "supcon_loss", _supcon(2)),
    ("supcon_loss_sparse", "supcon_loss", _supcon(7)),
    ("supcon_loss_ref", "supcon_loss", _supcon(3, ref=True)),
    ("supcon_loss_confident", "supcon_loss", _supcon_confident),
    ("dcl_loss", "dcl_loss", _dcl()),
    ("dcl_loss_weighted", "dcl_loss", _dcl(weight_sigma=0.5)),
    ("hard_negative_loss", "hard_negative_loss", _hcl()),
    ("hard_negative_loss_nonorm", "hard_negative_loss", _hcl(normalize=False, beta=0.5, tau_plus=0.05)),
    ("hard_negative_loss_confident", "hard_negative_loss", _hcl_confident()),  # (the clamp: losses ~1e-8)
    ("hard_negative_loss_confident_unbiased", "hard_negative_loss", _hcl_confident(beta=0.5, tau_plus=0.0)),
    ("uniformity_loss", "uniformity_loss", _uniformity),
    ("uniformity_loss_offset", "uniformity_loss", _uniformity_offset),
    ("barlow_twins_gather", "barlow_twins_loss", _xc("gather")),
    ("barlow_twins_all_reduce", "barlow_twins_loss", _xc("all_reduce", lambd=0.1)),
    ("barlow_twins_auto_wide", "barlow_twins_loss", _xc("auto", dim=23)),
    ("vicreg_gather", "vicreg_loss", _xc("gather")),
    ("vicreg_all_reduce", "vicreg_loss", _xc("all_reduce")),
]
FAMILY = {"info_nce": "lse", "nt_xent": "lse", "clip_loss": "lse", "supcon_loss": "lse", "dcl_loss": "lse",
          "hard_negative_loss": "lse", "uniformity_loss": "lse",
          "siglip_loss": "pairwise", "barlow_twins_loss": "xcorr", "vicreg_loss": "xcorr"}
MODES = ("gather", "ring")


def configs(backend_names):
    """(backend, dtype, tag): the reference in float64, kernel backends in float32."""
    out = []
    for be in backend_names:
        dt = torch.float64 if be == "reference" else torch.float32
        out.append((be, dt, f"{be}-{str(dt).split('.')[-1]}"))
    return out


def runs_here(be, fname):
    return be == "reference" or ck.backends.unavailable_reason(be, FAMILY[fname], "cpu") is None


def case_keys(backend_names, world):
    """The result keys one run produces (the test module parametrizes over the same list)."""
    keys = []
    for be, _, tag in configs(backend_names):
        keys += [f"loss/{name}/{mode}/{tag}" for name, fname, _ in LOSS_CASES for mode in MODES
                 if runs_here(be, fname)]
        keys += [f"ddp/{fname}/{mode}/{tag}" for fname, _ in DDP_CASES for mode in MODES if runs_here(be, fname)]
        keys += [k[-1] for k in nonfinite_keys(be)]
        if be != "reference":
            keys += [f"confident/{name}/{mode}/{be}-bfloat16" for name in CONFIDENT_CASES for mode in MODES]
            keys += [f"autocast/{fname}/{mode}/{be}-float16" for fname in AUTOCAST_CASES for mode in MODES]
    return keys


def _split(t, W, r):
    n = t.shape[0] // W
    return t[r * n:(r + 1) * n]


def _leaf(t):
    t = t.detach().clone()
    if t.is_floating_point():
        t.requires_grad_(True)
    return t


def run_loss_case(name, fname, build, mode, backend, dt, W, r):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 7 * W)
    split, shared, kw, gkw, dkw = build(g, W, dt)
    # single-process global loss: float64 reference on the same (rounded) inputs
    gsplit = {k: _leaf(v.double() if v.is_floating_point() else v) for k, v in split.items()}
    gshared = {k: _leaf(v.double()) for k, v in shared.items()}
    gargs = dict(gsplit, **gshared, **kw)
    if gkw is not None:
        gargs.update(gkw(W, split))
    gloss = getattr(ck, fname)(**gargs, backend="reference")
    gloss.backward()

    lsplit = {k: _leaf(_split(v, W, r)) for k, v in split.items()}
    lshared = {k: _leaf(v) for k, v in shared.items()}
    loss = getattr(ckd, fname)(**lsplit, **lshared, **kw, **dkw, backend=backend, mode=mode)
    loss.backward()
    errs = {}
    mean_loss = loss.detach().double().clone()
    dist.all_reduce(mean_loss)
    errs["loss(mean over ranks)"] = rel_err(mean_loss / W, gloss)
    for k, v in lsplit.items():
        if v.is_floating_point():
            errs[f"d{k}"] = rel_err(v.grad, W * _split(gsplit[k].grad, W, r))
    for k, v in lshared.items():
        gr = v.grad.detach().double().clone()
        dist.all_reduce(gr)
        errs[f"d{k}(mean over ranks)"] = rel_err(gr / W, gshared[k].grad)
    return errs


# Confident rows in bfloat16: the positive near probability 1 (mean loss ~0.3), where a
# gradient p - 1 formed from two separately rounded terms loses most of its digits.  The
# measure is each input's gradient error against world_size x the float64 global gradient
# (on the same rounded inputs), as a multiple of the floor: that float64 gradient rounded
# once to bfloat16.
CONFIDENT_CASES = {
    "clip": ("clip_loss", dict(logit_scale=100.0)),
    "nt_xent": ("nt_xent", dict(temperature=0.02)),
    "info_nce": ("info_nce", dict(temperature=0.01)),
    "info_nce_symmetric": ("info_nce", dict(temperature=0.01, symmetric=True)),
    "dcl": ("dcl_loss", dict(temperature=0.05)),
    "hcl": ("hard_negative_loss", dict(temperature=0.05)),
    "supcon": ("supcon_loss", dict(temperature=0.05)),  # (x_i, y_i) share a label: one positive each
}


def _confident_call(fn, fname, a, b, first, **kw):
    """fn on the two views; supcon_loss on their rows together, pair i's label first + i."""
    if fname != "supcon_loss":
        return fn(a, b, **kw)
    lab = torch.arange(first, first + a.shape[0])
    return fn(torch.cat([a, b]), torch.cat([lab, lab]), **kw)


def run_confident_case(name, mode, backend, W, r, n=32, d=32):
    fname, kw = CONFIDENT_CASES[name]
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + 11 * W)
    x, y = confident_pairs(n * W, d, 1.15, g)
    x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    gx, gy = _leaf(x.double()), _leaf(y.double())
    _confident_call(getattr(ck, fname), fname, gx, gy, 0, **kw, backend="reference").backward()
    lx, ly = _leaf(_split(x, W, r)), _leaf(_split(y, W, r))
    _confident_call(getattr(ckd, fname), fname, lx, ly, r * n, **kw, backend=backend, mode=mode).backward()
    errs = {}
    for k, v, ref in (("dx", lx, gx), ("dy", ly, gy)):
        want = W * _split(ref.grad, W, r)
        errs[f"{k}/floor"] = rel_err(v.grad, want) / rel_err(want.to(torch.bfloat16), want)
    return errs


# DDP: a tiny linear encoder shared by both views; one forward per step.
def _ddp_views(fname):
    return {"info_nce": ("query", "key"), "nt_xent": ("z1", "z2"), "clip_loss": ("image", "text"),
            "siglip_loss": ("image", "text"), "dcl_loss": ("z1", "z2"), "barlow_twins_loss": ("z1", "z2"),
            "hard_negative_loss": ("z1", "z2"), "uniformity_loss": ("x",),
            "vicreg_loss": ("z1", "z2"), "supcon_loss": ("embeddings",)}[fname]


DDP_CASES = [("info_nce", {"temperature": 0.3}), ("nt_xent", {}), ("clip_loss", {"logit_scale": 3.0}),
             ("siglip_loss", {"logit_scale": 2.0, "logit_bias": -1.0}), ("supcon_loss", {}), ("dcl_loss", {}),
             ("hard_negative_loss", {"temperature": 0.4}), ("uniformity_loss", {"t": 1.5}),
             ("barlow_twins_loss", {}), ("vicreg_loss", {})]


# Non-finite input on one rank (SPEC: never a silently finite loss): global row 0 of every
# view is +inf in feature 0 and every other row's feature 0 is -1, so each rank's anchors meet
# a -inf logit against that key (a term exp(-inf) = 0 a kernel could drop) or, SigLIP, a
# softplus(-inf) = 0 term; row 0 of supcon has a label of its own (a negative for everyone).
# Every rank's loss must be non-finite: each touches the poisoned key.
NONFINITE_CASES = {"info_nce": {"normalize": False}, "nt_xent": {"normalize": False}, "clip_loss":
                   {"logit_scale": 2.0}, "siglip_loss": {"logit_scale": 2.0, "logit_bias": -1.0},
                   "supcon_loss": {"normalize": False}, "dcl_loss": {"normalize": False},
                   "hard_negative_loss": {"normalize": False}, "uniformity_loss": {},
                   "barlow_twins_loss": {}, "vicreg_loss": {}}


def nonfinite_dtypes(be):
    """float64 on the reference; float32 and bfloat16 on the kernels (16-bit operands keep
    inf * -1 = -inf where the float32 path's TF32 split already makes it NaN), except bfloat16
    Triton under the interpreter (helpers.interpreter_bf16_broken)."""
    if be == "reference":
        return [torch.float64]
    return [torch.float32] + ([] if interpreter_bf16_broken(be) else [torch.bfloat16])


def nonfinite_keys(be):
    return [(fname, mode, dt, f"nonfinite/{fname}/{mode}/{be}-{str(dt).split('.')[-1]}")
            for fname in NONFINITE_CASES if runs_here(be, fname) for mode in MODES for dt in nonfinite_dtypes(be)]


def run_nonfinite_case(fname, mode, backend, dt, W, r):
    views = _ddp_views(fname)
    g = torch.Generator().manual_seed(zlib.crc32(fname.encode()) + 5 * W)
    xs = []
    for _ in views:
        x = torch.randn(W * N, D, generator=g, dtype=torch.float64)
        x[:, 0] = -1.0
        x[0, 0] = math.inf
        xs.append(_split(x, W, r).to(dt))
    kw = dict(NONFINITE_CASES[fname])
    if fname == "supcon_loss":
        labels = torch.zeros(W * N, dtype=torch.long)
        labels[0] = 7
        kw["labels"] = _split(labels, W, r)
    loss = getattr(ckd, fname)(**dict(zip(views, xs)), **kw, backend=backend, mode=mode)
    return {"loss": float(loss)}


def run_ddp_case(fname, kw, mode, backend, dt, W, r):
    from torch.nn.parallel import DistributedDataParallel as DDP
    views = _ddp_views(fname)
    g = torch.Generator().manual_seed(zlib.crc32(fname.encode()) + W)
    din = 4
    xs = [_f(g, W * N, din, dt) for _ in views]
    labels = torch.randint(0, 2, (W * N,), generator=g)
    torch.manual_seed(99)
    lin = torch.nn.Linear(din, D).to(dt)
    ref = torch.nn.Linear(din, D).to(torch.float64)
    ref.load_state_dict({k: v.double() for k, v in lin.state_dict().items()})
    extra = {"labels": labels} if fname == "supcon_loss" else {}
    # single process, global batch
    out = ref(torch.cat([x.double() for x in xs]))
    gviews = dict(zip(views, out.split(W * N)))
    getattr(ck, fname)(**gviews, **kw, **{k: v for k, v in extra.items()}, backend="reference").backward()
    # distributed
    model = DDP(lin)
    out = model(torch.cat([_split(x, W, r) for x in xs]))
    lviews = dict(zip(views, out.split(N)))
    lextra = {k: _split(v, W, r) for k, v in extra.items()}
    getattr(ckd, fname)(**lviews, **kw, **lextra, backend=backend, mode=mode).backward()
    return {f"d{k}(after DDP)": rel_err(p.grad, dict(ref.named_parameters())[k].grad)
            for k, p in lin.named_parameters()}


# torch.autocast: the distributed similarity losses cast their embeddings as the single-process
# ones do; forward and backward inside a float16 region on float32 inputs must give exactly the
# results of the same call on inputs cast by hand (float16: the interpreter's bfloat16 is broken).
AUTOCAST_CASES = ["nt_xent", "clip_loss", "siglip_loss", "supcon_loss", "hard_negative_loss"]


def run_autocast_case(fname, mode, backend, W, r):
    views = _ddp_views(fname)
    g = torch.Generator().manual_seed(zlib.crc32(fname.encode()) + 3 * W)
    xs = [_split(_f(g, W * N, D, torch.float32), W, r) for _ in views]
    kw = dict(dict(DDP_CASES)[fname])
    if fname == "supcon_loss":
        kw["labels"] = _split(torch.randint(0, 2, (W * N,), generator=g), W, r)

    def run(inputs, amp):
        leaves = [_leaf(x) for x in inputs]
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            loss = getattr(ckd, fname)(**dict(zip(views, leaves)), **kw, backend=backend, mode=mode)
            loss.backward()
        return loss.detach(), [x.grad for x in leaves]

    loss, grads = run(xs, True)
    want, want_grads = run([x.half() for x in xs], False)
    errs = {"loss": float((loss.double() - want.double()).abs())}
    for v, g_, w in zip(views, grads, want_grads):
        errs[f"d{v}"] = float((g_.double() - w.double()).abs().max()) if g_.dtype == torch.float32 else math.inf
    return errs


def _outcome(call):
    """{"raised": "ValueError" (any subclass), another exception's type name or None, "message": its
    text} of call()."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        return {"raised": "ValueError" if isinstance(exc, ValueError) else type(exc).__name__, "message": str(exc)}
    return {"raised": None, "message": ""}


def run_uneven(fname, W, r):
    views = _ddp_views(fname)
    n = N + r  # rank r has N + r rows
    args = {v: torch.randn(n, D) for v in views}
    if fname == "supcon_loss":
        args["labels"] = torch.zeros(n, dtype=torch.long)
    kw = {"clip_loss": {"logit_scale": 1.0}, "siglip_loss": {"logit_scale": 1.0, "logit_bias": 0.0}}.get(fname, {})
    return _outcome(lambda: getattr(ckd, fname)(**args, **kw, mode="gather"))


# A global batch of one row (world 1): the losses that need two rows say so.
TOO_SMALL = ("dcl_loss", "hard_negative_loss", "uniformity_loss", "barlow_twins_loss", "vicreg_loss")


def run_too_small(fname):
    return _outcome(lambda: getattr(ckd, fname)(**{v: torch.randn(1, D) for v in _ddp_views(fname)}, mode="gather"))


def run_compat_barlow_one_row():
    """lightly.BarlowTwinsLoss(gather_distributed=True) on local batches of one row: each rank
    standardizes over its own batch (lightly's F.batch_norm refuses one row)."""
    from contrastive_kernels.compat import lightly as L
    return _outcome(lambda: L.BarlowTwinsLoss(gather_distributed=True)(torch.randn(1, D), torch.randn(1, D)))


def main():
    rank, world, init_file, out_dir, backends_arg = sys.argv[1:6]
    rank, world = int(rank), int(world)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}

    def record(key, fn):
        try:
            results[key] = {"errs": fn()}
        except Exception:  # noqa: BLE001  (reported; the test fails on it)
            results[key] = {"exception": traceback.format_exc()}

    for be, dt, tag in configs([b for b in backends_arg.split(",") if b]):
        for name, fname, build in LOSS_CASES:
            if runs_here(be, fname):
                for mode in MODES:
                    record(f"loss/{name}/{mode}/{tag}",
                           lambda: run_loss_case(name, fname, build, mode, be, dt, world, rank))
        for fname, kw in DDP_CASES:
            if runs_here(be, fname):
                for mode in MODES:
                    record(f"ddp/{fname}/{mode}/{tag}", lambda: run_ddp_case(fname, kw, mode, be, dt, world, rank))
        for fname, mode, ndt, key in nonfinite_keys(be):
            record(key, lambda: run_nonfinite_case(fname, mode, be, ndt, world, rank))
        if be != "reference":
            for fname in AUTOCAST_CASES:
                for mode in MODES:
                    record(f"autocast/{fname}/{mode}/{be}-float16",
                           lambda: run_autocast_case(fname, mode, be, world, rank))
            for name in CONFIDENT_CASES:
                for mode in MODES:
                    record(f"confident/{name}/{mode}/{be}-bfloat16",
                           lambda: run_confident_case(name, mode, be, world, rank))
    if world == 1:
        for fname in TOO_SMALL:
            results[f"too_small/{fname}"] = run_too_small(fname)
    if world > 1:
        run_module_cases(world, rank, record)
        for fname, _ in DDP_CASES:
            results[f"uneven/{fname}"] = run_uneven(fname, world, rank)
        results["one_row/compat/lightly.BarlowTwinsLoss"] = run_compat_barlow_one_row()
    dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


# ------------------------------------------------------------------ module cases
# The originals' distributed computations, written from their documented semantics with
# full matrices in float64 (the compat modules must reproduce each rank's loss and
# gradients exactly, gradient-scale conventions included).
def _gather_sum(x):
    """All-gather whose backward sums every rank's gradient into the owner (what
    torch.distributed.nn.all_gather and lightly's GatherLayer do)."""
    import torch.distributed.nn as dnn
    return torch.cat(dnn.all_gather(x))


def _gather_nograd(x):
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    return parts


def orig_clip(img, txt, s, local_loss, gwg):
    r, w = dist.get_rank(), dist.get_world_size()
    if gwg:
        ai, at = _gather_sum(img), _gather_sum(txt)
    else:
        gi, gt = _gather_nograd(img), _gather_nograd(txt)
        if not local_loss:
            gi[r], gt[r] = img, txt
        ai, at = torch.cat(gi), torch.cat(gt)
    if local_loss:
        lpi, lpt = s * img @ at.T, s * txt @ ai.T
        labels = torch.arange(img.shape[0]) + img.shape[0] * r
    else:
        lpi = s * ai @ at.T
        lpt = lpi.T
        labels = torch.arange(lpi.shape[0])
    ce = torch.nn.functional.cross_entropy
    return (ce(lpi, labels) + ce(lpt, labels)) / 2


def orig_siglip(img, txt, s, b):
    r, w = dist.get_rank(), dist.get_world_size()
    at = _gather_sum(txt).split(txt.shape[0])

    def one(t, negative_only):
        logits = s * img @ t.T + b
        lab = -torch.ones_like(logits)
        if not negative_only:
            lab = lab + 2 * torch.eye(logits.shape[0], dtype=logits.dtype)
        return -torch.nn.functional.logsigmoid(lab * logits).sum() / img.shape[0]
    loss = one(txt, False)
    for i in range(w):
        if i != r:
            loss = loss + one(at[i], True)
    return loss


def _eye_rank(n):
    r, w = dist.get_rank(), dist.get_world_size()
    m = torch.zeros(n, n * w, dtype=torch.bool)
    m[torch.arange(n), torch.arange(n) + r * n] = True
    return m


def orig_ntxent(out0, out1, t):
    n = out0.shape[0]
    out0, out1 = torch.nn.functional.normalize(out0, dim=1), torch.nn.functional.normalize(out1, dim=1)
    a0, a1 = _gather_sum(out0), _gather_sum(out1)
    mask = _eye_rank(n)
    l00, l01, l10, l11 = out0 @ a0.T / t, out0 @ a1.T / t, out1 @ a0.T / t, out1 @ a1.T / t
    l00, l11 = l00[~mask].view(n, -1), l11[~mask].view(n, -1)
    logits = torch.cat([torch.cat([l01, l00], 1), torch.cat([l10, l11], 1)])
    labels = (torch.arange(n) + dist.get_rank() * n).repeat(2)
    return torch.nn.functional.cross_entropy(logits, labels)


def orig_dcl(out0, out1, t, sigma=None):
    out0, out1 = torch.nn.functional.normalize(out0, dim=1), torch.nn.functional.normalize(out1, dim=1)
    a0, a1 = _gather_sum(out0), _gather_sum(out1)
    n = out0.shape[0]
    mask = _eye_rank(n)

    def one(x, y, xa, ya):
        s00, s01 = x @ xa.T / t, x @ ya.T / t
        pos = -s01[mask]
        if sigma is not None:
            sim = (x.detach() * y.detach()).sum(1) / sigma
            pos = pos * (2 - n * torch.softmax(sim, dim=0))
        # lightly >= 1.6: one log-sum-exp over all negatives (DCL paper Eq. 6)
        negs = torch.cat([s00[~mask].view(n, -1), s01[~mask].view(n, -1)], 1)
        return (pos + torch.logsumexp(negs, 1)).mean()
    return 0.5 * (one(out0, out1, a0, a1) + one(out1, out0, a1, a0))


def orig_barlow(z_a, z_b, lambd):
    def bn(z):
        z = z - z.mean(0)
        return z / torch.sqrt(z.var(0, unbiased=False) + 1e-5)
    w = dist.get_world_size()
    c = bn(z_a).T @ bn(z_b) / z_a.shape[0] / w
    with torch.no_grad():
        tot = c.clone()
        dist.all_reduce(tot)
    # lightly >= 1.5.26 / 1.6 all-reduces c / world_size with torch.distributed.nn's autograd-aware
    # all_reduce, whose backward sums every rank's gradient of the (same) loss: world_size times the
    # gradient through this rank's c (written out here, not with that op)
    c = tot + w * (c - c.detach())
    off = c - torch.diag_embed(torch.diagonal(c))
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off.pow(2).sum()


def orig_vicreg(z_a, z_b, lam, mu, nu, eps):
    inv = torch.nn.functional.mse_loss(z_a, z_b)
    za, zb = _gather_sum(z_a), _gather_sum(z_b)

    def var(x):
        return torch.relu(1.0 - torch.sqrt(x.var(0) + eps)).mean()

    def cov(x):
        x = x - x.mean(0)
        n, d = x.shape
        c = x.T @ x / (n - 1)
        return (c - torch.diag_embed(torch.diagonal(c))).pow(2).sum() / d
    return lam * inv + mu * 0.5 * (var(za) + var(zb)) + nu * (cov(za) + cov(zb))


def run_compat_case(name, W, r):
    from contrastive_kernels.compat import lightly as L, open_clip as O
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()) + W)
    x1, x2 = _f(g, W * N, D, torch.float32), _f(g, W * N, D, torch.float32)
    ours_in = [_leaf(_split(x, W, r)) for x in (x1, x2)]
    ref_in = [_leaf(_split(x, W, r).double()) for x in (x1, x2)]
    scal = {}
    kind, _, opt = name.partition(":")
    if kind == "open_clip.ClipLoss":
        local_loss, gwg = (o == "1" for o in opt.split(","))
        s_ours, s_ref = _leaf(torch.tensor(2.5)), _leaf(torch.tensor(2.5, dtype=torch.float64))
        ours = O.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=r, world_size=W)(*ours_in, s_ours)
        ref = orig_clip(*ref_in, s_ref, local_loss, gwg)
        scal["dlogit_scale"] = (s_ours, s_ref)
    elif kind == "real open_clip.ClipLoss":  # open_clip's own loss.py (float64), not a replica
        local_loss, gwg = (o == "1" for o in opt.split(","))
        s_ours, s_ref = _leaf(torch.tensor(2.5)), _leaf(torch.tensor(2.5, dtype=torch.float64))
        ours = O.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=r, world_size=W)(*ours_in, s_ours)
        ref = _peers._open_clip_loss().ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=r,
                                             world_size=W)(*ref_in, s_ref)
        scal["dlogit_scale"] = (s_ours, s_ref)
    elif kind == "real open_clip.SigLipLoss":
        s_ours, s_ref = _leaf(torch.tensor(3.0)), _leaf(torch.tensor(3.0, dtype=torch.float64))
        b_ours, b_ref = _leaf(torch.tensor(-2.0)), _leaf(torch.tensor(-2.0, dtype=torch.float64))
        ours = O.SigLipLoss(rank=r, world_size=W, dist_impl=opt)(*ours_in, s_ours, b_ours)
        ref = _peers._open_clip_loss().SigLipLoss(rank=r, world_size=W, dist_impl=opt)(*ref_in, s_ref, b_ref)
        scal["dlogit_scale"], scal["dlogit_bias"] = (s_ours, s_ref), (b_ours, b_ref)
    elif kind == "open_clip.SigLipLoss":
        s_ours, s_ref = _leaf(torch.tensor(3.0)), _leaf(torch.tensor(3.0, dtype=torch.float64))
        b_ours, b_ref = _leaf(torch.tensor(-2.0)), _leaf(torch.tensor(-2.0, dtype=torch.float64))
        ours = O.SigLipLoss(rank=r, world_size=W, dist_impl=opt)(*ours_in, s_ours, b_ours)
        ref = orig_siglip(*ref_in, s_ref, b_ref)
        scal["dlogit_scale"], scal["dlogit_bias"] = (s_ours, s_ref), (b_ours, b_ref)
    elif kind == "lightly.NTXentLoss":
        ours = L.NTXentLoss(temperature=0.3, gather_distributed=True)(*ours_in)
        ref = orig_ntxent(*ref_in, 0.3)
    elif kind == "lightly.DCLLoss":
        ours = L.DCLLoss(temperature=0.2, gather_distributed=True)(*ours_in)
        ref = orig_dcl(*ref_in, 0.2)
    elif kind == "lightly.DCLWLoss":
        ours = L.DCLWLoss(temperature=0.2, sigma=0.5, gather_distributed=True)(*ours_in)
        ref = orig_dcl(*ref_in, 0.2, sigma=0.5)
    elif kind == "lightly.BarlowTwinsLoss":
        ours = L.BarlowTwinsLoss(lambda_param=0.1, gather_distributed=True)(*ours_in)
        ref = orig_barlow(*ref_in, 0.1)
    elif kind == "lightly.VICRegLoss":
        ours = L.VICRegLoss(gather_distributed=True)(*ours_in)
        ref = orig_vicreg(*ref_in, 25.0, 25.0, 1.0, 1e-4)
    else:
        raise KeyError(name)
    ours.backward()
    ref.backward()
    errs = {"loss(this rank)": rel_err(ours, ref)}
    for i, (a, b) in enumerate(zip(ours_in, ref_in)):
        errs[f"dinput{i}(this rank)"] = rel_err(a.grad, b.grad)
    for k, (a, b) in scal.items():
        errs[k + "(this rank)"] = rel_err(a.grad, b.grad)
    return errs


COMPAT_CASES = ([f"open_clip.ClipLoss:{a},{b}" for a in "01" for b in "01"]
                + [f"open_clip.SigLipLoss:{i}" for i in ("bidir", "shift", "reduce", "gather")]
                + [f"real open_clip.ClipLoss:{a},{b}" for a in "01" for b in "01"]
                + [f"real open_clip.SigLipLoss:{i}" for i in ("bidir", "shift", "reduce", "gather")]
                + ["lightly.NTXentLoss", "lightly.DCLLoss", "lightly.DCLWLoss", "lightly.BarlowTwinsLoss",
                   "lightly.VICRegLoss"])

# nn modules with distributed= against the same module on the global batch
NN_CASES = [("InfoNCELoss", dict(temperature=0.2, learn_temperature=True), ("query", "key"), False),
            ("NTXentLoss", dict(temperature=0.4, learn_temperature=True), ("z1", "z2"), False),
            ("ClipLoss", dict(), ("image", "text"), False),
            ("SigLipLoss", dict(init_logit_scale=1.0, init_logit_bias=-1.0), ("image", "text"), False),
            ("SupConLoss", dict(learn_temperature=True), ("embeddings",), True),
            ("DCLLoss", dict(temperature=0.3, learn_temperature=True), ("z1", "z2"), False),
            ("DCLWLoss", dict(temperature=0.3, sigma=0.7, learn_temperature=True), ("z1", "z2"), False),
            ("HardNegativeLoss", dict(temperature=0.4, beta=0.7, tau_plus=0.05, learn_temperature=True),
             ("z1", "z2"), False),
            ("UniformityLoss", dict(t=1.5), ("x",), False),
            ("BarlowTwinsLoss", dict(lambd=0.05), ("z1", "z2"), False),
            ("VICRegLoss", dict(), ("z1", "z2"), False)]


def run_nn_case(cls_name, kw, views, labeled, mode, W, r):
    cls = getattr(ck.nn, cls_name)
    g = torch.Generator().manual_seed(zlib.crc32(cls_name.encode()) + W)
    xs = [_f(g, W * N, D, torch.float64) for _ in views]
    labels = torch.randint(0, 2, (W * N,), generator=g)
    ref_mod = cls(**kw, backend="reference").double()  # float64 parameters too
    mod = cls(**kw, backend="reference", distributed=mode).double()
    gl = [_leaf(x) for x in xs]
    ll = [_leaf(_split(x, W, r)) for x in xs]
    extra_g = (labels,) if labeled else ()
    extra_l = (_split(labels, W, r),) if labeled else ()
    gloss = ref_mod(*gl, *extra_g)
    gloss.backward()
    loss = mod(*ll, *extra_l)
    loss.backward()
    m = loss.detach().clone()
    dist.all_reduce(m)
    errs = {"loss(mean over ranks)": rel_err(m / W, gloss)}
    for i, (a, b) in enumerate(zip(ll, gl)):
        errs[f"d{views[i]}"] = rel_err(a.grad, W * _split(b.grad, W, r))
    for (k, p), (_, q) in zip(mod.named_parameters(), ref_mod.named_parameters()):
        if p.requires_grad:
            gp = p.grad.detach().clone()
            dist.all_reduce(gp)
            errs[f"d{k}(mean over ranks)"] = rel_err(gp / W, q.grad)
    return errs


def module_keys():
    return ([f"compat/{c}" for c in COMPAT_CASES]
            + [f"nn/{c[0]}/{m}" for c in NN_CASES for m in MODES])


def run_module_cases(world, rank, record):
    for c in COMPAT_CASES:
        record(f"compat/{c}-float32", lambda: run_compat_case(c, world, rank))
    for cls_name, kw, views, labeled in NN_CASES:
        for mode in MODES:
            record(f"nn/{cls_name}/{mode}-float64",
                   lambda: run_nn_case(cls_name, kw, views, labeled, mode, world, rank))


if __name__ == "__main__":
    main()
