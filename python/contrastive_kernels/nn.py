"""``torch.nn`` modules over the functional API.

Every module takes ``backend=`` (None: ``CONTRASTIVE_KERNELS_BACKEND`` or "auto") and
``distributed=None | "gather" | "ring"`` with ``process_group=`` (see
`contrastive_kernels.distributed` for the gradient rule; not with ``NTXentLoss``'s memory
bank, whose queue is this rank's).
``learn_temperature=True`` makes the temperature a parameter, stored as its log so it
stays positive (CLIP's convention); ``ClipLoss`` and ``SigLipLoss`` own a learnable
logit scale (and bias) initialised as in open_clip.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from . import _validation as V
from . import functional as F

__all__ = ["InfoNCELoss", "NTXentLoss", "ClipLoss", "SigLipLoss", "SupConLoss", "DCLLoss", "DCLWLoss",
           "HardNegativeLoss", "UniformityLoss", "BarlowTwinsLoss", "VICRegLoss"]

DISTRIBUTED_MODES = (None, "gather", "ring")


def _check_distributed(distributed, process_group):
    if distributed not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed must be None, 'gather' or 'ring'; got {distributed!r}")
    if distributed is None and process_group is not None:
        raise ValueError("process_group is only used with distributed='gather' or 'ring'")
    return distributed


def _dist_call(name: str, mode: str, group, *args, **kwargs):
    from . import distributed as D  # imported lazily: torch.distributed is optional
    fn = getattr(D, name, None)
    if fn is None:
        raise NotImplementedError(f"distributed={mode!r} is not implemented for {name}")
    return fn(*args, mode=mode, group=group, **kwargs)


class _TemperatureMixin(nn.Module):
    """A fixed temperature (float buffer-free) or a learnable one (log-parametrised)."""

    def _init_temperature(self, temperature, learn: bool):
        # (a learnable one is log-parametrised: positive; a fixed one any non-zero number, as the functions)
        V.scalar("temperature", temperature, positive=learn, nonzero=True)
        t = float(temperature)
        if learn:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(t)))
        else:
            self.log_temperature = None
            self._temperature = t

    @property
    def temperature(self):
        if self.log_temperature is not None:
            return self.log_temperature.exp()
        return self._temperature

    def extra_repr(self) -> str:
        t = self.temperature
        t = float(t.detach()) if isinstance(t, Tensor) else t
        learn = self.log_temperature is not None
        return f"temperature={t:.4g}, learn_temperature={learn}, backend={self.backend!r}"


class InfoNCELoss(_TemperatureMixin):
    """`contrastive_kernels.info_nce` as a module; ``forward(query, key, negatives=None,
    positive_index=None)``."""

    def __init__(self, temperature=0.1, *, learn_temperature: bool = False, in_batch_negatives: bool = True,
                 symmetric: bool = False, decoupled: bool = False, normalize: bool = True, reduction: str = "mean",
                 backend: Optional[str] = None, distributed: Optional[str] = None, process_group=None):
        super().__init__()
        self._init_temperature(temperature, learn_temperature)
        self.in_batch_negatives, self.symmetric, self.decoupled = in_batch_negatives, symmetric, decoupled
        self.normalize, self.reduction, self.backend = normalize, V.choice("reduction", reduction,
                                                                          ("mean", "sum", "none")), backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, query: Tensor, key: Tensor, negatives: Optional[Tensor] = None,
                positive_index: Optional[Tensor] = None) -> Tensor:
        kw = dict(negatives=negatives, temperature=self.temperature, positive_index=positive_index,
                  in_batch_negatives=self.in_batch_negatives, symmetric=self.symmetric, decoupled=self.decoupled,
                  normalize=self.normalize, reduction=self.reduction, backend=self.backend)
        if self.distributed:
            return _dist_call("info_nce", self.distributed, self.process_group, query, key, **kw)
        return F.info_nce(query, key, **kw)


class NTXentLoss(_TemperatureMixin):
    """SimCLR's NT-Xent (`contrastive_kernels.nt_xent`); ``forward(z1, z2)``.

    ``memory_bank_size > 0`` turns it into MoCo-style InfoNCE as lightly does: the
    positive of ``z1[i]`` is ``z2[i]`` and the candidates are that positive plus the
    bank, a FIFO queue of past normalized ``z2`` rows (initialised with random unit
    vectors, updated after each forward whose ``z1`` requires grad). The size is an int
    (the dimension taken from the first batch) or ``(size, dim)``."""

    def __init__(self, temperature=0.5, memory_bank_size=0, *, learn_temperature: bool = False,
                 normalize: bool = True, backend: Optional[str] = None, distributed: Optional[str] = None,
                 process_group=None):
        super().__init__()
        self._init_temperature(temperature, learn_temperature)
        self.normalize, self.backend = normalize, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group
        self.bank = MemoryBank(memory_bank_size)

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.bank.size == 0:
            if self.distributed:
                return _dist_call("nt_xent", self.distributed, self.process_group, z1, z2,
                                  temperature=self.temperature, normalize=self.normalize, backend=self.backend)
            return F.nt_xent(z1, z2, self.temperature, normalize=self.normalize, backend=self.backend)
        V.matrix("z1", z1)
        V.matrix("z2", z2)
        V.same_shape(z1=z1, z2=z2)
        if self.distributed:
            raise NotImplementedError("NTXentLoss with a memory bank has no distributed mode; use "
                                      "compat.lightly.NTXentLoss(gather_distributed=True) semantics instead")
        if self.normalize:  # normalized once here: the queued rows are used as stored, not re-normalized
            z1, z2 = torch.nn.functional.normalize(z1, dim=1), torch.nn.functional.normalize(z2, dim=1)
        bank = self.bank.query_and_update(z2, update=z1.requires_grad)
        return F.info_nce(z1, z2, negatives=bank.to(z1.dtype), temperature=self.temperature,
                          in_batch_negatives=False, normalize=False, backend=self.backend)


class MemoryBank(nn.Module):
    """A FIFO queue of feature rows, lightly's MemoryBankModule semantics: (size, dim)
    float32, initialised with random unit rows (at construction when the dimension is
    known, else at the first batch), queried before it is updated; a batch that does not
    fit before the end fills the tail and the pointer wraps to 0. With
    ``gather_distributed`` the batches of all ranks are enqueued (lightly's option)."""

    def __init__(self, size=0, gather_distributed: bool = False):
        super().__init__()
        self.gather_distributed = gather_distributed
        if isinstance(size, bool) or not isinstance(size, (int, tuple, list)):
            raise TypeError(f"memory_bank_size must be an int or a (size, dim) tuple, got {size!r}")
        size = (size,) if isinstance(size, int) else tuple(int(s) for s in size)
        if len(size) not in (1, 2) or size[0] < 0 or (len(size) == 2 and size[1] <= 0):
            raise ValueError(f"memory_bank_size must be a non-negative int or (size, dim), got {size}")
        self.size = size[0]
        self.register_buffer("bank", torch.empty(0), persistent=False)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long), persistent=False)
        if len(size) == 2 and self.size > 0:
            self._init(size[1])

    @torch.no_grad()
    def _init(self, dim: int):
        self.bank = torch.nn.functional.normalize(torch.randn(self.size, dim), dim=-1).to(self.bank.device)
        self.ptr.zero_()

    @torch.no_grad()
    def query_and_update(self, batch: Tensor, update: bool) -> Tensor:
        if self.bank.ndim == 1:
            self._init(batch.shape[1])
        if batch.shape[1] != self.bank.shape[1]:
            raise ValueError(f"memory bank holds rows of dim {self.bank.shape[1]}, got a batch of shape "
                             f"{tuple(batch.shape)}")
        out = self.bank.clone()
        if update and self.gather_distributed and torch.distributed.is_available() \
                and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            # lightly: every rank enqueues the batches of all ranks (in rank order), no gradient
            parts = [torch.empty_like(batch) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, batch.detach().contiguous())
            batch = torch.cat(parts)
        if update:
            ptr, b = int(self.ptr), batch.shape[0]
            if ptr + b >= self.size:
                self.bank[ptr:] = batch[: self.size - ptr].detach().to(self.bank)
                self.ptr.zero_()
            else:
                self.bank[ptr:ptr + b] = batch.detach().to(self.bank)
                self.ptr.fill_(ptr + b)
        return out


class ClipLoss(nn.Module):
    """CLIP loss with a learnable logit scale (open_clip init ``ln(1/0.07)``, used as
    ``exp(logit_scale)`` and clamped to 100 like open_clip's models);
    ``forward(image, text, logit_scale=None)`` uses the module's scale when none is given."""

    def __init__(self, init_logit_scale: float = math.log(1 / 0.07), *, learn_logit_scale: bool = True,
                 max_logit_scale: float = 100.0, backend: Optional[str] = None, distributed: Optional[str] = None,
                 process_group=None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn_logit_scale)
        self.max_logit_scale, self.backend = max_logit_scale, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, image: Tensor, text: Tensor, logit_scale=None, logit_bias=None) -> Tensor:
        if logit_scale is None:
            logit_scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
        if self.distributed:
            return _dist_call("clip_loss", self.distributed, self.process_group, image, text, logit_scale,
                              logit_bias, backend=self.backend)
        return F.clip_loss(image, text, logit_scale, logit_bias, backend=self.backend)


class SigLipLoss(nn.Module):
    """SigLIP loss with learnable scale and bias (open_clip init: scale ``ln 10`` used as
    ``exp``, bias -10); ``forward(image, text, logit_scale=None, logit_bias=None)``."""

    def __init__(self, init_logit_scale: float = math.log(10.0), init_logit_bias: float = -10.0, *,
                 learn: bool = True, backend: Optional[str] = None, distributed: Optional[str] = None,
                 process_group=None):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)), requires_grad=learn)
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias)), requires_grad=learn)
        self.backend = backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, image: Tensor, text: Tensor, logit_scale=None, logit_bias=None) -> Tensor:
        scale = self.logit_scale.exp() if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        if self.distributed:
            return _dist_call("siglip_loss", self.distributed, self.process_group, image, text, scale, bias,
                              backend=self.backend)
        return F.siglip_loss(image, text, scale, bias, backend=self.backend)


class SupConLoss(_TemperatureMixin):
    """`contrastive_kernels.supcon_loss`; ``forward(embeddings, labels, ref_embeddings=None, ref_labels=None)``."""

    def __init__(self, temperature=0.1, *, learn_temperature: bool = False, normalize: bool = True,
                 backend: Optional[str] = None, distributed: Optional[str] = None, process_group=None):
        super().__init__()
        self._init_temperature(temperature, learn_temperature)
        self.normalize, self.backend = normalize, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, embeddings: Tensor, labels: Tensor, ref_embeddings: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None) -> Tensor:
        kw = dict(temperature=self.temperature, ref_embeddings=ref_embeddings, ref_labels=ref_labels,
                  normalize=self.normalize, backend=self.backend)
        if self.distributed:
            return _dist_call("supcon_loss", self.distributed, self.process_group, embeddings, labels, **kw)
        return F.supcon_loss(embeddings, labels, **kw)


class DCLLoss(_TemperatureMixin):
    """Decoupled contrastive loss (`contrastive_kernels.dcl_loss`); ``forward(z1, z2)``."""

    def __init__(self, temperature=0.1, *, learn_temperature: bool = False, normalize: bool = True,
                 backend: Optional[str] = None, distributed: Optional[str] = None, process_group=None):
        super().__init__()
        self._init_temperature(temperature, learn_temperature)
        self.normalize, self.backend = normalize, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group
        self.weight_sigma = None

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        kw = dict(weight_sigma=self.weight_sigma, normalize=self.normalize, backend=self.backend)
        if self.distributed:
            return _dist_call("dcl_loss", self.distributed, self.process_group, z1, z2, self.temperature, **kw)
        return F.dcl_loss(z1, z2, self.temperature, **kw)


class DCLWLoss(DCLLoss):
    """DCL with the negative von Mises-Fisher weights of width ``sigma``."""

    def __init__(self, temperature=0.1, sigma=0.5, *, learn_temperature: bool = False, normalize: bool = True,
                 backend: Optional[str] = None, distributed: Optional[str] = None, process_group=None):
        super().__init__(temperature, learn_temperature=learn_temperature, normalize=normalize, backend=backend,
                         distributed=distributed, process_group=process_group)
        V.scalar("sigma", sigma, positive=True)
        self.weight_sigma = float(sigma)


class HardNegativeLoss(_TemperatureMixin):
    """Robinson et al. 2021 hard-negative contrastive loss (`contrastive_kernels.hard_negative_loss`)."""

    def __init__(self, temperature=0.5, beta=1.0, tau_plus=0.1, *, learn_temperature: bool = False,
                 normalize: bool = True, backend: Optional[str] = None, distributed: Optional[str] = None,
                 process_group=None):
        super().__init__()
        self._init_temperature(temperature, learn_temperature)
        V.scalar("beta", beta)
        V.scalar("tau_plus", tau_plus, lower=0.0, upper=1.0)
        self.beta, self.tau_plus, self.normalize, self.backend = beta, tau_plus, normalize, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        kw = dict(beta=self.beta, tau_plus=self.tau_plus, normalize=self.normalize, backend=self.backend)
        if self.distributed:
            return _dist_call("hard_negative_loss", self.distributed, self.process_group, z1, z2, self.temperature,
                              **kw)
        return F.hard_negative_loss(z1, z2, self.temperature, **kw)


class UniformityLoss(nn.Module):
    """Wang & Isola's uniformity ``log mean_{i != j} exp(-t |x_i - x_j|^2)``; ``forward(x)``."""

    def __init__(self, t=2.0, *, backend: Optional[str] = None, distributed: Optional[str] = None,
                 process_group=None):
        super().__init__()
        V.scalar("t", t)
        self.t, self.backend = t, backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, x: Tensor) -> Tensor:
        if self.distributed:  # every rank gets the uniformity of the global batch
            return _dist_call("uniformity_loss", self.distributed, self.process_group, x, self.t,
                              backend=self.backend)
        return F.uniformity_loss(x, self.t, backend=self.backend)


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins (`contrastive_kernels.barlow_twins_loss`); ``forward(z1, z2)``."""

    def __init__(self, lambd=0.0051, *, eps=1e-5, path: str = "auto", backend: Optional[str] = None,
                 distributed: Optional[str] = None, process_group=None):
        super().__init__()
        V.scalar("lambd", lambd)
        self.lambd, self.eps, self.path, self.backend = lambd, eps, V.choice("path", path, ("auto", "gram", "tiled")), backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.distributed:
            return _dist_call("barlow_twins_loss", self.distributed, self.process_group, z1, z2, self.lambd,
                              eps=self.eps, backend=self.backend, path=self.path)
        return F.barlow_twins_loss(z1, z2, self.lambd, eps=self.eps, backend=self.backend, path=self.path)


class VICRegLoss(nn.Module):
    """VICReg (`contrastive_kernels.vicreg_loss`); ``forward(z1, z2)``."""

    def __init__(self, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, *, eps=1e-4, path: str = "auto",
                 backend: Optional[str] = None, distributed: Optional[str] = None, process_group=None):
        super().__init__()
        self.sim_coeff, self.std_coeff, self.cov_coeff, self.eps = sim_coeff, std_coeff, cov_coeff, eps
        self.path, self.backend = V.choice("path", path, ("auto", "gram", "tiled")), backend
        self.distributed, self.process_group = _check_distributed(distributed, process_group), process_group

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        if self.distributed:
            return _dist_call("vicreg_loss", self.distributed, self.process_group, z1, z2, self.sim_coeff,
                              self.std_coeff, self.cov_coeff, eps=self.eps, backend=self.backend, path=self.path)
        return F.vicreg_loss(z1, z2, self.sim_coeff, self.std_coeff, self.cov_coeff, eps=self.eps,
                             backend=self.backend, path=self.path)
