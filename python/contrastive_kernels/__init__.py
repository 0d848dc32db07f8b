"""contrastive_kernels: fused kernels for contrastive and redundancy-reduction losses.

Same numbers as lightly / open_clip / pytorch-metric-learning, with memory linear in
the batch: the N x M similarity matrix (and the D x D correlation matrix where a
cheaper path exists) is never materialized on the fused backends.

    import contrastive_kernels as ck
    loss = ck.clip_loss(image_features, text_features, logit_scale)
"""
from __future__ import annotations

__version__ = "0.1.0"

from . import _ext
from .backends import BACKENDS, BackendError, available_backends
from .functional import (alignment_loss, barlow_twins_loss, clip_loss, cross_correlation, dcl_loss,
                         hard_negative_loss, info_nce, normalized_similarity, nt_xent, siglip_loss, supcon_loss,
                         uniformity_loss, vicreg_loss)
from . import nn  # noqa: E402  (modules build on the functional API)


def build_info() -> dict:
    """What the compiled extension contains (empty when it is not built)."""
    return _ext.build_info()


__all__ = [
    "available_backends", "BACKENDS", "BackendError", "build_info", "nn",
    "normalized_similarity", "info_nce", "nt_xent", "clip_loss", "siglip_loss", "supcon_loss", "dcl_loss",
    "hard_negative_loss", "uniformity_loss", "alignment_loss", "cross_correlation", "barlow_twins_loss",
    "vicreg_loss",
]
