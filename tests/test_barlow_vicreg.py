"""barlow_twins_loss and vicreg_loss on every backend against independent formulas:
facebookresearch/barlowtwins and facebookresearch/vicreg (written out here), and the
formulations of lightly's BarlowTwinsLoss ((C - I)^2 with lambda on the off-diagonal) and
VICRegLoss (einsum covariance, boolean off-diagonal mask), with the SPEC's normalization."""
import pytest
import torch
import torch.nn.functional as F

import contrastive_kernels as ck
from helpers import TOL, backend_params, peak_rss_growth, rel_err

BACKENDS = [pytest.param("reference", id="reference")] + backend_params("xcorr")
PATHS = ("auto", "gram", "tiled")


# ------------------------------------------------------------- independent formulas
def _fb_off_diagonal(x):
    n, m = x.shape
    assert n == m
    return x.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def fb_barlow(z1, z2, lambd=0.0051):
    """facebookresearch/barlowtwins: BatchNorm1d(affine=False) in training mode, c / batch size."""
    bn = torch.nn.BatchNorm1d(z1.shape[1], affine=False).to(z1.dtype)
    bn.train()
    c = bn(z1).T @ bn(z2)
    c = c / z1.shape[0]
    on_diag = torch.diagonal(c).add(-1).pow(2).sum()
    off_diag = _fb_off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


def lightly_style_barlow(z1, z2, lambd=0.0051, eps=1e-5):
    """lightly's BarlowTwinsLoss formulation (c - I)^2, off-diagonal scaled by lambda."""
    def bn(z):
        return (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + eps)
    n, d = z1.shape
    c = bn(z1).T @ bn(z2) / n
    eye = torch.eye(d, dtype=c.dtype)
    c_diff = (c - eye).pow(2)
    weight = torch.where(eye.bool(), torch.ones_like(c), torch.full_like(c, lambd))
    return (c_diff * weight).sum()


def fb_vicreg(x, y, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0):
    """facebookresearch/vicreg main_vicreg.py VICReg.forward (single process)."""
    batch_size, num_features = x.shape
    repr_loss = F.mse_loss(x, y)
    x = x - x.mean(dim=0)
    y = y - y.mean(dim=0)
    std_x = torch.sqrt(x.var(dim=0) + 0.0001)
    std_y = torch.sqrt(y.var(dim=0) + 0.0001)
    std_loss = torch.mean(F.relu(1 - std_x)) / 2 + torch.mean(F.relu(1 - std_y)) / 2
    cov_x = (x.T @ x) / (batch_size - 1)
    cov_y = (y.T @ y) / (batch_size - 1)
    cov_loss = _fb_off_diagonal(cov_x).pow(2).sum().div(num_features) + \
        _fb_off_diagonal(cov_y).pow(2).sum().div(num_features)
    return sim_coeff * repr_loss + std_coeff * std_loss + cov_coeff * cov_loss


def lightly_style_vicreg(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=0.0001):
    """lightly's VICRegLoss formulation: invariance, variance, covariance terms."""
    def variance(x):
        std = torch.sqrt(x.var(dim=0) + eps)
        return torch.mean(F.relu(1.0 - std))

    def covariance(x):
        x = x - x.mean(dim=0)
        n, d = x.shape
        cov = torch.einsum("bc,bd->cd", x, x) / (n - 1)
        mask = ~torch.eye(d, dtype=torch.bool)
        return cov[mask].pow(2).sum() / d

    inv = F.mse_loss(z_a, z_b)
    var = 0.5 * (variance(z_a) + variance(z_b))
    cov = covariance(z_a) + covariance(z_b)
    return lambda_param * inv + mu_param * var + nu_param * cov


# -------------------------------------------------------------------------- helpers
def _views(n, d, dtype, seed_shift=0.0):
    z1 = torch.randn(n, d, dtype=torch.float64) * 0.7 + seed_shift
    z2 = 0.6 * z1 + 0.5 * torch.randn(n, d, dtype=torch.float64)
    return z1.to(dtype), z2.to(dtype)


def _loss_and_grads(fn, z1, z2):
    z1 = z1.detach().clone().requires_grad_()
    z2 = z2.detach().clone().requires_grad_()
    loss = fn(z1, z2)
    g1, g2 = torch.autograd.grad(loss, [z1, z2])
    return loss, g1, g2


def _compare(backend, ours, independent, z1, z2, dtype):
    """Reference backend in float64: 1e-10 of the independent formula.  Kernel backends:
    the SPEC tolerance against the independent formula in float64 on the same (rounded) inputs."""
    if backend == "reference":
        z1, z2 = z1.double(), z2.double()
        tol = 1e-10
    else:
        tol = TOL[dtype]
    loss, g1, g2 = _loss_and_grads(ours, z1, z2)
    rloss, r1, r2 = _loss_and_grads(independent, z1.double(), z2.double())
    assert loss.dtype == (torch.float64 if backend == "reference" else torch.float32)
    assert g1.dtype == z1.dtype and g2.dtype == z2.dtype
    for what, x, r in (("loss", loss, rloss), ("dz1", g1, r1), ("dz2", g2, r2)):
        err = rel_err(x, r)
        assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.0e} ({backend}, {dtype})"


def _dtypes(backend):
    if backend == "reference":
        return (torch.float64,)
    if backend == "triton" and not torch.cuda.is_available():
        return (torch.float32, torch.float16)  # interpreter bf16 is wrong (STYLE.md)
    return (torch.float32, torch.float16, torch.bfloat16)


def _paths(backend):
    return ("auto",) if backend == "reference" else PATHS


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(2, 7), (9, 65), (33, 5), (64, 129)])
@pytest.mark.parametrize("independent", [fb_barlow, lightly_style_barlow], ids=["fb", "lightly"])
def test_barlow_twins(backend, n, d, independent):
    for dtype in _dtypes(backend):
        for path in _paths(backend):
            z1, z2 = _views(n, d, dtype)
            kw = {} if backend == "reference" else {"path": path}
            _compare(backend, lambda a, b: ck.barlow_twins_loss(a, b, backend=backend, **kw), independent,
                     z1, z2, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_barlow_twins_lambda(backend):
    z1, z2 = _views(7, 33, torch.float64 if backend == "reference" else torch.float32)
    _compare(backend, lambda a, b: ck.barlow_twins_loss(a, b, lambd=0.3, backend=backend),
             lambda a, b: fb_barlow(a, b, lambd=0.3), z1, z2, z1.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(2, 7), (9, 65), (33, 5), (64, 129)])
@pytest.mark.parametrize("independent", [fb_vicreg, lightly_style_vicreg], ids=["fb", "lightly"])
def test_vicreg(backend, n, d, independent):
    for dtype in _dtypes(backend):
        for path in _paths(backend):
            # Small-variance views, so that the variance hinge is active on some features.
            z1, z2 = _views(n, d, dtype)
            z1 = z1 * torch.linspace(0.2, 2.0, d).to(dtype)
            kw = {} if backend == "reference" else {"path": path}
            _compare(backend, lambda a, b: ck.vicreg_loss(a, b, backend=backend, **kw), independent,
                     z1, z2, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vicreg_coefficients(backend):
    z1, z2 = _views(6, 17, torch.float64 if backend == "reference" else torch.float32)
    _compare(backend, lambda a, b: ck.vicreg_loss(a, b, 3.0, 7.0, 0.5, backend=backend),
             lambda a, b: fb_vicreg(a, b, 3.0, 7.0, 0.5), z1, z2, z1.dtype)


def test_path_is_validated():
    z1, z2 = _views(4, 8, torch.float32)
    with pytest.raises(ValueError, match="path"):
        ck.barlow_twins_loss(z1, z2, backend="cpu", path="dense")
    with pytest.raises(ValueError, match="path"):
        ck.vicreg_loss(z1, z2, backend="cpu", path="dense")


def test_path_reaches_the_kernel(monkeypatch):
    from contrastive_kernels import _families as fam
    seen = []
    real = fam.xcorr

    def spy(backend, a, b, *, path=0):
        seen.append(path)
        return real(backend, a, b, path=path)

    monkeypatch.setattr(fam, "xcorr", spy)
    z1, z2 = _views(4, 8, torch.float32)
    for name, pid in (("auto", 0), ("gram", 1), ("tiled", 2)):
        seen.clear()
        ck.barlow_twins_loss(z1, z2, backend="cpu", path=name)
        ck.vicreg_loss(z1, z2, backend="cpu", path=name)
        assert seen == [pid, pid, pid]


@pytest.mark.slow
def test_barlow_twins_peak_memory_no_dxd():
    """N = 256, D = 8192 fwd+bwd on the cpu backend: a D x D float32 buffer is 256 MB;
    the whole step must grow the peak RSS by less than 120 MB."""
    if "cpu" not in ck.available_backends("xcorr", "cpu"):
        pytest.fail("the C++ CPU kernels are not built")
    setup = """
        import contrastive_kernels as ck
        torch.manual_seed(0)
        z1 = torch.randn(256, 8192, requires_grad=True)
        z2 = torch.randn(256, 8192, requires_grad=True)
        small1 = torch.randn(16, 64, requires_grad=True)
        ck.barlow_twins_loss(small1, small1 * 2, backend="cpu").backward()  # warm-up (lazy init)
    """
    body = """
        loss = ck.barlow_twins_loss(z1, z2, backend="cpu")
        loss.backward()
        assert torch.isfinite(loss)
    """
    r = peak_rss_growth(setup, body)
    print(f"peak RSS growth {r['growth'] / 2**20:.1f} MB")
    assert r["growth"] < 120 * 2**20, f"peak RSS grew by {r['growth'] / 2**20:.1f} MB"
