"""lightly's losses (``lightly.loss``), fused: ``NTXentLoss``, ``DCLLoss``, ``DCLWLoss``,
``BarlowTwinsLoss``, ``VICRegLoss``.

Semantics follow lightly's current release (1.6.0, read from its wheel): NT-Xent normalizes both views and
uses every other row of the 2N batch as a candidate, or with ``memory_bank_size`` the
MoCo form (positive plus the bank of past normalized ``out1`` rows, updated when
``out0`` requires grad); DCL is Eq. 6 of the paper as lightly 1.6 computes it (one
log-sum-exp over the same-view and other-view negatives); Barlow Twins standardizes each view with
BatchNorm statistics (biased variance, eps 1e-5; lightly PR #1806) and, with
``gather_distributed``, all-reduces C through autograd (lightly >= 1.5.26, PR #1980); VICReg is the
facebookresearch loss.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import nn as ck_nn
from ._common import world_size


def _dist():
    from .. import distributed as D  # imported lazily: torch.distributed is optional
    return D

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "BarlowTwinsLoss", "VICRegLoss"]


def _check_temperature(temperature):
    if abs(temperature) < 1e-8:
        raise ValueError("Illegal temperature: abs({}) < 1e-8".format(temperature))


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False).

    ``memory_bank_size`` is an int (dimension from the first batch, older lightly) or
    ``(size, dim)`` (lightly 1.5)."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.backend = backend
        self.memory_bank = ck_nn.MemoryBank(memory_bank_size, gather_distributed=gather_distributed)

    @F._amp_boundary("out0", "out1")
    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.memory_bank.size == 0:
            if self.gather_distributed and world_size() > 1:
                # lightly: local 2N rows against the gathered views of every rank, positives offset by
                # rank * N, mean over local rows; its gather sums the gradients into the owner.
                return _dist().nt_xent(out0, out1, self.temperature, backend=self.backend, mode="gather")
            return F.nt_xent(out0, out1, self.temperature, backend=self.backend)
        # lightly normalizes both views, queues the normalized out1 rows (gathered from every
        # rank first when gather_distributed, see MemoryBank.query_and_update) and uses the bank
        # rows as stored: normalize here, not in info_nce, so the bank is not normalized twice.
        out0 = torch.nn.functional.normalize(out0, dim=1)
        out1 = torch.nn.functional.normalize(out1, dim=1)
        bank = self.memory_bank.query_and_update(out1, update=out0.requires_grad)
        return F.info_nce(out0, out1, negatives=bank.to(device=out0.device, dtype=out0.dtype),
                          temperature=self.temperature, in_batch_negatives=False, normalize=False,
                          backend=self.backend)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights ``2 - N softmax(<out0_i, out1_i> / sigma)`` (no gradient), as lightly."""
    similarity = (out0.detach() * out1.detach()).sum(1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


class DCLLoss(nn.Module):
    """lightly.loss.DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False).

    ``weight_fn(out0, out1)`` receives the normalized views and scales the positive term,
    as in lightly (its gradient flows through the returned weights)."""

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        self.backend = backend

    @F._amp_boundary("out0", "out1")
    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return self._dcl(out0, out1, self.weight_fn)

    def _dcl(self, out0: Tensor, out1: Tensor, weight_fn) -> Tensor:
        if self.gather_distributed and world_size() > 1:
            # lightly: local rows against both views of every rank; weight_fn sees the local rows only
            loss = _dist().dcl_loss(out0, out1, self.temperature, backend=self.backend, mode="gather")
        else:
            loss = F.dcl_loss(out0, out1, self.temperature, backend=self.backend)
        if weight_fn is None:
            return loss
        # lightly: each direction's positive term is -w * s_ii / tau; dcl_loss used w = 1, so
        # add 0.5 * mean((1 - w) * s_ii / tau) for each direction.
        a = torch.nn.functional.normalize(out0, dim=1)
        b = torch.nn.functional.normalize(out1, dim=1)
        ct = torch.promote_types(a.dtype, torch.float32)  # float32 for half inputs, float64 stays float64
        pos = (a.to(ct) * b.to(ct)).sum(1) / self.temperature
        w0, w1 = weight_fn(a, b), weight_fn(b, a)
        return loss + 0.5 * ((1 - w0) * pos).mean() + 0.5 * ((1 - w1) * pos).mean()


class DCLWLoss(DCLLoss):
    """lightly.loss.DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: Optional[str] = None):
        super().__init__(temperature=temperature, gather_distributed=gather_distributed, backend=backend)
        self.sigma = sigma

    @F._amp_boundary("out0", "out1")
    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        if self.gather_distributed and world_size() > 1:
            # lightly's weights are the softmax over the LOCAL batch even when gathering
            return self._dcl(out0, out1, lambda x, y: negative_mises_fisher_weights(x, y, self.sigma))
        return F.dcl_loss(out0, out1, self.temperature, weight_sigma=self.sigma, backend=self.backend)


class BarlowTwinsLoss(nn.Module):
    """lightly.loss.BarlowTwinsLoss(lambda_param=5e-3, gather_distributed=False)."""

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.lambda_param = lambda_param
        self.gather_distributed = gather_distributed
        self.backend = backend

    @F._amp_boundary()
    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if self.gather_distributed and world_size() > 1:
            return self._distributed(z_a, z_b)
        return F.barlow_twins_loss(z_a, z_b, self.lambda_param, eps=1e-5, backend=self.backend)

    def _distributed(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """lightly (>= 1.5.26, 1.6; lightly PR #1980, issue #1977): each rank standardizes with
        its local statistics, C is the mean over ranks of the local C (D x D), all-reduced by the
        autograd-aware all-reduce, whose backward sums the ranks' gradients of C: each rank's
        gradient is world_size times what it was with the plain all-reduce of lightly <= 1.5.25
        (there the reduction was outside autograd, so under DDP's averaging every gradient came out
        1 / world_size too small)."""
        from .. import _validation as V
        V.matrix("z_a", z_a)
        V.matrix("z_b", z_b)
        V.same_device_dtype(z_a=z_a, z_b=z_b)
        V.same_shape(z_a=z_a, z_b=z_b)
        if z_a.shape[0] < 2:  # (lightly's F.batch_norm refuses it too)
            raise ValueError("BarlowTwinsLoss standardizes each feature over the local batch (BatchNorm1d in "
                             f"training mode): z_a needs at least 2 rows on every rank, got shape {tuple(z_a.shape)}")
        w = torch.distributed.get_world_size()
        def standardize(z):  # BatchNorm statistics of the local batch (biased variance, eps 1e-5)
            z = z.double() if z.dtype == torch.float64 else z.float()
            z = z - z.mean(0)
            return z * torch.rsqrt(z.var(0, unbiased=False) + 1e-5)
        a, b = standardize(z_a), standardize(z_b)
        c = _dist().all_reduce_with_grad(a.T @ b / (z_a.shape[0] * w))
        diag = torch.diagonal(c)
        off = c - torch.diag_embed(diag)
        return (diag - 1).pow(2).sum() + self.lambda_param * off.pow(2).sum()


class VICRegLoss(nn.Module):
    """lightly.loss.VICRegLoss(lambda_param=25.0, mu_param=25.0, nu_param=1.0,
    gather_distributed=False, eps=0.0001)."""

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 0.0001, *, backend: Optional[str] = None):
        super().__init__()
        self.lambda_param, self.mu_param, self.nu_param = lambda_param, mu_param, nu_param
        self.gather_distributed = gather_distributed
        self.eps = eps
        self.backend = backend

    @F._amp_boundary()
    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if not (z_a.shape[0] > 1 and z_b.shape[0] > 1):
            raise ValueError(f"z_a and z_b must have batch size > 1 but found {z_a.shape[0]} and {z_b.shape[0]}")
        if z_a.dim() > 2 or z_b.dim() > 2:
            # lightly takes (batch, ..., dim) (VICRegL's local features): the invariance is the mean
            # over every element, the variance and covariance terms are each position's (its
            # statistics over the batch), averaged over the positions: so the loss is the mean
            # over positions of the two-dimensional loss of that position's (batch, dim) slices.
            if z_a.shape != z_b.shape:
                raise ValueError(f"z_a and z_b must have the same shape, got {tuple(z_a.shape)} and "
                                 f"{tuple(z_b.shape)}")
            a = z_a.reshape(z_a.shape[0], -1, z_a.shape[-1])
            b = z_b.reshape(z_b.shape[0], -1, z_b.shape[-1])
            if a.shape[1] == 0:
                raise ValueError(f"z_a has no positions between its batch and feature dimensions: "
                                 f"shape {tuple(z_a.shape)}")
            return torch.stack([self._loss(a[:, i], b[:, i]) for i in range(a.shape[1])]).mean()
        return self._loss(z_a, z_b)

    def _loss(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        if self.gather_distributed and world_size() > 1:
            # lightly: local invariance term; variance and covariance of the gathered batch, whose
            # gather sums the gradients into the owner: exactly our distributed vicreg_loss
            return _dist().vicreg_loss(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, eps=self.eps,
                                       backend=self.backend, mode="gather")
        return F.vicreg_loss(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, eps=self.eps,
                             backend=self.backend)
