"""open_clip's losses (``open_clip.loss``), fused: ``ClipLoss`` and ``SigLipLoss``.

Same constructor and forward signatures as open_clip 3.x; the same values and
gradients. The features are used as given (open_clip's models normalize them before
the loss); ``logit_scale`` is the multiplier (already exponentiated)."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .. import functional as F
from ._common import check_rank_world

__all__ = ["ClipLoss", "SigLipLoss"]


class ClipLoss(nn.Module):
    """open_clip.loss.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=False,
    rank=0, world_size=1, use_horovod=False)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *, backend: Optional[str] = None):
        super().__init__()
        if use_horovod:
            raise NotImplementedError("use_horovod=True is not supported; use torch.distributed")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.backend = backend

    @F._amp_boundary("image_features", "text_features")
    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias=None,
                output_dict: bool = False):
        if self.world_size > 1:
            loss = self._distributed(image_features, text_features, logit_scale, logit_bias)
        else:
            loss = F.clip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def _distributed(self, image, text, logit_scale, logit_bias):
        """open_clip's four combinations, with its gradients:
        local_loss=True: local rows against the gathered features (gather_with_grad:
        autograd gather whose backward sums into the owner; without it the gathered
        features carry no gradient at all); local_loss=False: every rank computes the
        loss of the full global batch (without gather_with_grad only this rank's own
        slice carries gradient)."""
        from .. import distributed as D
        check_rank_world("ClipLoss", self.rank, self.world_size)
        if self.local_loss:
            return D.clip_loss(image, text, logit_scale, logit_bias, backend=self.backend, mode="gather",
                               key_grad=self.gather_with_grad)
        how = "sum" if self.gather_with_grad else "local"
        return F.clip_loss(D.gather_features(image, grad=how), D.gather_features(text, grad=how), logit_scale,
                           logit_bias, backend=self.backend)


class SigLipLoss(nn.Module):
    """open_clip.loss.SigLipLoss(cache_labels=False, rank=0, world_size=1, dist_impl=None)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, chunk_size: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather'; got {dist_impl!r}")
        # chunk_size (some open_clip forks) only bounds the memory of the materializing
        # version; the fused kernels never build the matrix, so it changes nothing here.
        self.chunk_size = chunk_size
        self.backend = backend

    @F._amp_boundary("image_features", "text_features")
    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias  # open_clip adds no bias when it is None
        if self.world_size > 1:
            # Every dist_impl of open_clip computes the same numbers and gradients (local images
            # against every rank's texts, foreign blocks negative-only, /N_local, gradients summed
            # into the owner): "bidir" / "shift" exchange neighbour blocks -> our ring,
            # "reduce" / "gather" -> our gather.
            from .. import distributed as D
            check_rank_world("SigLipLoss", self.rank, self.world_size)
            mode = "ring" if self.dist_impl in ("bidir", "shift") else "gather"
            loss = D.siglip_loss(image_features, text_features, logit_scale, bias, backend=self.backend, mode=mode)
        else:
            loss = F.siglip_loss(image_features, text_features, logit_scale, bias, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss
