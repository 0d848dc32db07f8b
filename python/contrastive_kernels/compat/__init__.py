"""Drop-in replacements for the losses of lightly, open_clip and pytorch-metric-learning.

Same constructor signatures, defaults and forward signatures as the originals, so that
changing the import is the whole migration; same values and gradients. These modules
never import the original libraries.

    from contrastive_kernels.compat.lightly import NTXentLoss           # lightly.loss
    from contrastive_kernels.compat.open_clip import ClipLoss, SigLipLoss  # open_clip.loss
    from contrastive_kernels.compat.pytorch_metric_learning import NTXentLoss, SupConLoss
"""
from . import lightly, open_clip, pytorch_metric_learning  # noqa: F401

__all__ = ["lightly", "open_clip", "pytorch_metric_learning"]
