"""The CPU emulator of the CUDA kernels (csrc/cuda/emu) checked on its own.

The emulator lets the CUDA sources run, unchanged, on a machine without a GPU: the
family tests then run backend "cuda" on CPU tensors (CONTRASTIVE_KERNELS_CUDA_EMULATE=1,
extension built with CONTRASTIVE_KERNELS_BUILD_CUDA_EMU=1; CI does both).  Its verdicts
are only as good as its model of the hardware, so this file checks that model against
independent implementations: conversions against torch's, mma.sync against a float64
matrix product from the PTX ISA fragment layouts, and that the misuse the hardware
leaves undefined (divergent barriers, partial-warp collectives, deadlocks, launch
limits, reading cp.async data before its wait) is reported, not silently run.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.cuda_emu


@pytest.fixture(scope="module")
def emu():
    if os.environ.get("CONTRASTIVE_KERNELS_CUDA_EMULATE") != "1":
        pytest.fail("run the cuda_emu tests with CONTRASTIVE_KERNELS_CUDA_EMULATE=1")
    from contrastive_kernels import _ext
    mod = _ext.load_cuda_emu()
    assert mod is not None, _ext.cuda_emu_error()
    return mod


def _float_samples(n=20000):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g).float())
    # half / bfloat16 edge cases: subnormals, ties, overflow, specials
    specials = torch.tensor([0.0, -0.0, 65504.0, 65519.0, 65520.0, -65520.0, 6.1e-5, 5.96e-8, 2.98e-8, 2.99e-8,
                             1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38,
                             float("inf"), -float("inf"), 1e-45, 1.17e-38])
    return torch.cat([x, specials, torch.randn(n, generator=g) * 1e-6])


def test_half_bfloat16_conversions_match_torch(emu):
    x = _float_samples()
    h, b, _ = emu.convert_bits(x)
    assert torch.equal(h.to(torch.int16), x.half().view(torch.int16).to(torch.int32).to(torch.int16))
    assert torch.equal(b.to(torch.int16), x.bfloat16().view(torch.int16).to(torch.int32).to(torch.int16))
    # back to float32: exact
    hf, _ = emu.widen_bits(h)
    _, bf = emu.widen_bits(b)
    assert torch.equal(hf, x.half().float())
    assert torch.equal(bf, x.bfloat16().float())
    # NaN stays NaN
    hn, bn, _ = emu.convert_bits(torch.tensor([float("nan")]))
    assert torch.isnan(emu.widen_bits(hn)[0]).all() and torch.isnan(emu.widen_bits(bn)[1]).all()


def test_tf32_round_to_nearest_ties_away(emu):
    x = _float_samples()
    x = x[torch.isfinite(x)]
    _, _, t = emu.convert_bits(x)
    got = (t & 0xFFFFFFFF).to(torch.int64)
    # independent: |x| rounded to 10 explicit mantissa bits, halves away from zero, in float64
    xd = x.double()
    m, e = torch.frexp(xd)                       # x = m 2^e, 0.5 <= |m| < 1
    scaled = m.abs() * 2 ** 11                   # 11 significant bits (1 implicit + 10)
    r = torch.floor(scaled + 0.5) * torch.sign(m)
    want = (r * torch.exp2(e.double() - 11)).float()
    want_bits = want.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    normal = x.abs() >= 1.1754944e-38
    assert torch.equal(got[normal], want_bits[normal])


def _rand16(shape, dtype, g):
    return (torch.randn(shape, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mma_m16n8k16(emu, dtype):
    g = torch.Generator().manual_seed(3)
    a, b = _rand16((16, 16), dtype, g), _rand16((16, 8), dtype, g)
    c = torch.randn(16, 8, generator=g)
    bits = lambda t: t.view(torch.int16).to(torch.int32) & 0xFFFF  # noqa: E731
    out = emu.mma(bits(a), bits(b), c, 0 if dtype == torch.float16 else 1)
    want = (a.double() @ b.double() + c.double()).float()
    assert torch.equal(out, want)


def test_mma_m16n8k8_tf32_reads_19_bits(emu):
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(16, 8, generator=g), torch.randn(8, 8, generator=g)
    c = torch.randn(16, 8, generator=g)
    out = emu.mma(a, b, c, 2)
    trunc = lambda t: (t.view(torch.int32) & -8192).view(torch.float32).double()  # noqa: E731  (low 13 bits dropped)
    want = (trunc(a) @ trunc(b) + c.double()).float()
    assert torch.equal(out, want)
    assert not torch.equal(out, (a.double() @ b.double() + c.double()).float())


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_ldmatrix_layout(emu, num, trans):
    """PTX ISA, ldmatrix: lane 4 g + t receives in register m (row g; columns 2t, 2t + 1) of
    matrix m, with .trans (rows 2t, 2t + 1; column g); the first element in the low half."""
    g = torch.Generator().manual_seed(6)
    mats = torch.randint(0, 1 << 16, (num, 8, 8), generator=g, dtype=torch.int32)
    got = emu.ldmatrix(mats.reshape(-1), num, trans)
    for lane in range(32):
        gg, t = divmod(lane, 4)
        for m in range(num):
            lo, hi = ((mats[m, 2 * t, gg], mats[m, 2 * t + 1, gg]) if trans
                      else (mats[m, gg, 2 * t], mats[m, gg, 2 * t + 1]))
            assert got[lane, m].item() == lo.item() | (hi.item() << 16), (lane, m)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("a_kmajor", [False, True])
@pytest.mark.parametrize("b_kmajor", [False, True])
@pytest.mark.parametrize("n", [8, 16])
def test_fragment_loads_feed_mma(emu, dtype, a_kmajor, b_kmajor, n):
    """The kernels' ldmatrix fragment loads (tile_mma.cuh warp_mma16), from every storage order
    of A and B, give mma.sync the product A B (exact here: one MMA, summed exactly)."""
    g = torch.Generator().manual_seed(7 + n)
    a, b = _rand16((16, 16), dtype, g), _rand16((16, n), dtype, g)
    bits = lambda t: t.view(torch.int16).to(torch.int32) & 0xFFFF  # noqa: E731
    out = emu.frag_mma(bits(a), bits(b), dtype == torch.bfloat16, a_kmajor, b_kmajor)
    assert torch.equal(out, (a.double() @ b.double()).float())


_TRUNC_SCRIPT = r"""
import sys, torch
from contrastive_kernels import _ext
emu = _ext.load_cuda_emu()
g = torch.Generator().manual_seed(5)
a = torch.randn(16, 8, generator=g) * torch.exp2(torch.randint(-6, 6, (16, 8), generator=g).float())
b = torch.randn(8, 8, generator=g)
c = torch.randn(16, 8, generator=g) * 4
out = emu.mma(a, b, c, 2)
# two hand cases in row 0, column 0 (all other products of the row zero): c = +-1 plus a product
# of 0.75 ulp(1): to nearest it rounds away from 1, truncated it is dropped
ha, hb, hc = torch.zeros(16, 8), torch.zeros(8, 8), torch.zeros(16, 8)
ha[0, 0], hb[0, 0], hc[0, 0] = 1.5 * 2.0 ** -12, 2.0 ** -12, 1.0
hand = [emu.mma(ha, s * hb, s * hc, 2)[0, 0].item() for s in (1.0, -1.0)]
torch.save({"a": a, "b": b, "c": c, "out": out, "hand": hand}, sys.argv[1])
"""


def test_mma_truncating_model_matches_its_definition(tmp_path):
    """CK_EMU_MMA_ROUND=trunc (a pessimistic model of the tensor core's float32 accumulation):
    each addend aligned to the largest one, the bits below its float32 ulp dropped toward zero,
    the sum rounded toward zero; checked against that definition written here in float64."""
    import subprocess
    import sys

    env = dict(os.environ, CK_EMU_MMA_ROUND="trunc", CONTRASTIVE_KERNELS_CUDA_EMULATE="1")
    path = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-c", _TRUNC_SCRIPT, str(path)], env=env, check=True)
    r = torch.load(path)
    assert r["hand"] == [1.0, -1.0], f"0.75 ulp added to +-1 must be dropped when truncating, got {r['hand']}"
    tf = lambda t: (t.view(torch.int32) & -8192).view(torch.float32).double()  # noqa: E731
    a, b, c = tf(r["a"]), tf(r["b"]), r["c"].double()
    want = torch.empty(16, 8, dtype=torch.float32)
    for i in range(16):
        for j in range(8):
            terms = [c[i, j].item()] + [(a[i, k] * b[k, j]).item() for k in range(8)]
            amax = max(abs(x) for x in terms)
            q = 2.0 ** (torch.frexp(torch.tensor(amax, dtype=torch.float64)).exponent.item() - 24)
            s = sum(float(int(x / q)) * q for x in terms)  # int() truncates toward zero
            f = torch.tensor(s, dtype=torch.float64).float()
            if abs(f.item()) > abs(s):
                f = torch.nextafter(f, torch.zeros((), dtype=torch.float32))
            want[i, j] = f
    assert torch.equal(r["out"], want)
    nearest = (a @ b + c).float()
    assert not torch.equal(r["out"], nearest), "the truncating model must differ from rounding to nearest"


def test_correct_kernel_runs(emu):
    out = torch.zeros(64)
    assert emu.misuse(0, out) == "ok"
    # each warp's shuffle sum: 0 + ... + 31 and 32 + ... + 63
    assert torch.equal(out, torch.tensor([496.0] * 32 + [1520.0] * 32))


@pytest.mark.parametrize("which, message", [
    (1, "__syncthreads"),
    (2, "warp"),
    (3, "deadlock"),
    (5, "invalid grid"),
    (6, "invalid block size"),
    (10, "16-byte aligned"),
    (11, "cp.async: a 16-byte copy"),
])
def test_misuse_is_reported(emu, which, message):
    status = emu.misuse(which, torch.zeros(64))
    assert status != "ok" and message in status, status


def test_cp_async_lands_at_the_wait(emu):
    out = torch.zeros(64)
    assert emu.misuse(4, out) == "ok"
    assert out[0].item() == -1.0 and out[1].item() == 1.0


def test_family_op_errors_name_the_emulator(emu):
    """A launch failure inside an emulated op surfaces as an error, not as a result."""
    from contrastive_kernels import _families
    q = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="must be 2-D"):
        torch.ops.contrastive_kernels.lse_forward_cuda_emu(q[0], q, torch.tensor(1.0), None, None, None, None, None,
                                                           None, 0, 0, False)
    row, _ = _families.lse("cuda", q, q, torch.tensor(1.0))
    assert row.shape == (3,) and torch.isfinite(row).all()


# --- the order of threads and blocks (CK_EMU_SCHEDULE): a race detector ---------------------
#
# On a GPU the threads of a block run in no defined order between barriers, and blocks in
# none at all.  The emulator runs them in a fixed order unless CK_EMU_SCHEDULE says
# otherwise, so a kernel that reads (or overwrites) what another thread writes in the same
# barrier interval, or another block at all, can pass every numeric test here and be wrong
# on the hardware.  Running every kernel under several orders and requiring bitwise equal
# results catches such races without a GPU (compute-sanitizer racecheck, on a GPU, only
# sees shared memory).

_SCHEDULES = ("reverse", "shuffle:1", "shuffle:2")
_GROUPS, _SPLITS = "CONTRASTIVE_KERNELS_CUDA_BWD_GROUPS", "CONTRASTIVE_KERNELS_CUDA_COL_SPLITS"
_FUSED, _CHUNK = "CONTRASTIVE_KERNELS_CUDA_FUSED_COLS", "CONTRASTIVE_KERNELS_CUDA_COLS_CHUNK"
_WGMMA = "CONTRASTIVE_KERNELS_CUDA_WGMMA"


@pytest.mark.parametrize("which", [8, 9], ids=["threads", "blocks"])
def test_schedule_exposes_a_race(emu, which, monkeypatch):
    """The negative control: a kernel with a race gives different results under different
    orders (8: a write and reads of one shared value in a barrier interval; 9: a block reads
    what another block writes)."""
    results = {}
    for schedule in ("forward",) + _SCHEDULES:
        monkeypatch.setenv("CK_EMU_SCHEDULE", schedule)
        out = torch.zeros(64)
        assert emu.misuse(which, out) == "ok"
        results[schedule] = out
    if which == 8:
        # the last thread to reach a barrier runs on first: forward, thread 63 writes before
        # all reads; reverse, thread 0 reads before thread 63 writes
        assert torch.equal(results["forward"], torch.full((64,), 2.0))
        assert torch.equal(results["reverse"], torch.tensor([1.0] + [2.0] * 63))
        assert any(not torch.equal(results[s], results["forward"]) for s in _SCHEDULES[1:]), \
            "no shuffled order exposed the race"
    else:  # two blocks: a shuffle keeps their order half the time
        assert results["forward"][1].item() == 0.0 and results["reverse"][1].item() == 5.0


def test_schedule_bad_value_is_an_error(emu, monkeypatch):
    monkeypatch.setenv("CK_EMU_SCHEDULE", "backwards")
    status = emu.misuse(0, torch.zeros(64))
    assert "CK_EMU_SCHEDULE" in status and "backwards" in status, status


def _schedule_cases():
    """(name, function of a generator returning the tensors to compare, environment): every
    CUDA kernel family, forward and backward, at sizes with several blocks and partial tiles;
    the lse backward's block shapes and the column splits forced."""
    import contrastive_kernels as ck

    def grads(loss, *xs):
        loss.backward()
        return [loss.detach()] + [x.grad for x in xs]

    def leaf(g, *shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()

    def clip(dtype, d):
        def run(g):
            a, b = leaf(g, 70, d, dtype=dtype), leaf(g, 70, d, dtype=dtype)
            return grads(ck.clip_loss(a, b, torch.tensor(10.0), backend="cuda"), a, b)
        return run

    def supcon(g):
        x = leaf(g, 70, 40)
        labels = torch.randint(0, 5, (70,), generator=g)
        return grads(ck.supcon_loss(x, labels, 0.1, backend="cuda"), x)

    def info_nce_negatives(g):
        q, k, neg = leaf(g, 33, 48, dtype=torch.bfloat16), leaf(g, 33, 48, dtype=torch.bfloat16), leaf(g, 70, 48)
        return grads(ck.info_nce(q, k, negatives=neg.bfloat16(), temperature=0.1, backend="cuda"), q, k)

    def siglip(dtype):
        def run(g):
            a, b = leaf(g, 70, 40, dtype=dtype), leaf(g, 70, 40, dtype=dtype)
            return grads(ck.siglip_loss(a, b, torch.tensor(10.0), torch.tensor(-10.0), backend="cuda"), a, b)
        return run

    def uniformity(g):
        x = leaf(g, 70, 24)
        return grads(ck.uniformity_loss(x, backend="cuda"), x)

    def barlow(n, d, dtype):
        def run(g):
            a, b = leaf(g, n, d, dtype=dtype), leaf(g, n, d, dtype=dtype)
            return grads(ck.barlow_twins_loss(a, b, backend="cuda"), a, b)
        return run

    def vicreg(g):
        a, b = leaf(g, 70, 72), leaf(g, 70, 72)
        return grads(ck.vicreg_loss(a, b, backend="cuda"), a, b)

    def similarity(dtype):
        def run(g):
            a, b = leaf(g, 70, 40, dtype=dtype), leaf(g, 66, 40, dtype=dtype)
            s = torch.tensor(3.0, requires_grad=True)
            out = ck.normalized_similarity(a, b, s, backend="cuda")
            w = torch.randn(out.shape, generator=g)
            (out.float() * w).sum().backward()
            return [out.detach(), a.grad, b.grad, s.grad]
        return run

    return [
        ("clip_bf16_d300_g1", clip(torch.bfloat16, 300), {_GROUPS: "1"}),
        ("clip_bf16_d300_g2", clip(torch.bfloat16, 300), {_GROUPS: "2"}),
        ("clip_f32_d300_g1", clip(torch.float32, 300), {_GROUPS: "1"}),
        ("clip_f32_d300_g2", clip(torch.float32, 300), {_GROUPS: "2"}),
        ("clip_f16_d40_g2", clip(torch.float16, 40), {_GROUPS: "2"}),
        ("clip_bf16_d300_splits", clip(torch.bfloat16, 300), {_SPLITS: "2"}),
        ("clip_f16_d40_splits", clip(torch.float16, 40), {_SPLITS: "2"}),
        ("clip_bf16_d40_fused_chunk1", clip(torch.bfloat16, 40), {_SPLITS: "2", _CHUNK: "1"}),
        ("clip_f32_d40_two_passes", clip(torch.float32, 40), {_FUSED: "0"}),
        ("supcon_f32_splits", supcon, {_SPLITS: "2"}),
        ("siglip_bf16_splits", siglip(torch.bfloat16), {_SPLITS: "2"}),
        ("supcon_f32", supcon, {}),
        ("info_nce_negatives_bf16", info_nce_negatives, {}),
        ("siglip_bf16", siglip(torch.bfloat16), {}),
        ("siglip_f32", siglip(torch.float32), {}),
        ("uniformity_f32", uniformity, {}),
        ("barlow_tiled_bf16", barlow(70, 72, torch.bfloat16), {}),
        ("barlow_gram_f32", barlow(5, 130, torch.float32), {}),
        ("vicreg_f32", vicreg, {}),
        ("similarity_bf16", similarity(torch.bfloat16), {}),
        ("similarity_f32", similarity(torch.float32), {}),
        # the wgmma forward kernels (fused columns, split, pairwise, the column pass)
        ("clip_bf16_d300_wgmma", clip(torch.bfloat16, 300), {_WGMMA: "1"}),
        ("clip_f16_d40_wgmma_splits", clip(torch.float16, 40), {_WGMMA: "1", _SPLITS: "2"}),
        ("clip_bf16_d40_wgmma_two_passes", clip(torch.bfloat16, 40), {_WGMMA: "1", _FUSED: "0"}),
        ("siglip_bf16_wgmma", siglip(torch.bfloat16), {_WGMMA: "1"}),
    ]


@pytest.mark.parametrize("case", _schedule_cases(), ids=lambda c: c[0])
def test_kernels_do_not_depend_on_the_schedule(emu, case, monkeypatch):
    """Every CUDA kernel gives bitwise the same losses and gradients whatever the order of its
    threads between barriers and of its blocks (both backward block shapes of the lse family,
    the column splits, the fused forward in launches of one row block and the two-pass one)."""
    _, run, env = case
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    results = {}
    for schedule in ("forward",) + _SCHEDULES:
        monkeypatch.setenv("CK_EMU_SCHEDULE", schedule)
        results[schedule] = run(torch.Generator().manual_seed(11))
    want = results["forward"]
    assert all(t is not None and torch.isfinite(t).all() for t in want)
    for schedule in _SCHEDULES:
        for i, (x, y) in enumerate(zip(results[schedule], want)):
            assert torch.equal(x, y), f"output {i} differs under CK_EMU_SCHEDULE={schedule}: a race"


def _wgmma_operands():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 64, 16, generator=g).to(torch.bfloat16)


def test_wgmma_accumulators_land_at_the_wait(emu):
    """wgmma (tile_wgmma.cuh) is executed at the issuing thread's wait_group: d read before the
    wait is the old value (here 0), after it the m64n64k16 product in the PTX ISA's accumulator
    layout (thread 4 g + t of warp v: row 16 v + g, column 2 t for d[0])."""
    ops = _wgmma_operands()
    out = torch.full((256,), float("nan"))
    assert emu.wgmma_misuse(0, ops.view(torch.int16).reshape(-1), out) == "ok"
    assert torch.equal(out[:128], torch.zeros(128))
    prod = (ops[0].double() @ ops[1].double().T).float()
    tid = torch.arange(128)
    lane, warp = tid % 32, tid // 32
    want = prod[16 * warp + lane // 4, 2 * (lane % 4)]
    assert torch.allclose(out[128:], want, rtol=2 ** -22, atol=0), (out[128:] - want).abs().max()


def test_wgmma_reads_fenced_st_shared_stores(emu):
    """Operand data stored by st.shared (tile_wgmma.cuh's st_operand: here A's row 0 zeroed by
    threads 0-15), then fence.proxy.async and a barrier: the wgmma reads the stored values (the
    error case without the fence is case 8 below)."""
    ops = _wgmma_operands()
    out = torch.full((256,), float("nan"))
    assert emu.wgmma_misuse(9, ops.view(torch.int16).reshape(-1), out) == "ok"
    a = ops[0].double().clone()
    a[0] = 0
    prod = (a @ ops[1].double().T).float()
    tid = torch.arange(128)
    lane, warp = tid % 32, tid // 32
    want = prod[16 * warp + lane // 4, 2 * (lane % 4)]
    assert torch.equal(want[:4], torch.zeros(4))  # (lanes 0-3 of warp 0 hold row 0)
    assert torch.allclose(out[128:], want, rtol=2 ** -22, atol=0), (out[128:] - want).abs().max()


@pytest.mark.parametrize("which, message", [
    (1, "without a wgmma.fence"),
    (2, "fence.proxy.async"),
    (3, "swizzle pattern"),
    (4, "warps of warpgroup 0 issued different operands"),
    (5, "not whole warpgroups"),
    (6, "did not wait"),
    (7, "only the 128-byte swizzle"),  # a transposed B in another swizzle mode (not emulated: an error)
    (8, "that thread 0 stored (st.shared) without a fence.proxy.async"),  # tile_wgmma.cuh's st_operand
])
def test_wgmma_misuse_is_reported(emu, which, message):
    status = emu.wgmma_misuse(which, _wgmma_operands().view(torch.int16).reshape(-1), torch.zeros(256))
    assert status != "ok" and message in status, status
