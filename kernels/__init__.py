"""Triton kernels of contrastive_kernels, one module per kernel family.

Each module ``<family>.py`` holds its ``@triton.jit`` kernels and the plain launch
functions ``<family>_forward`` / ``<family>_backward`` whose arguments and results are
those of the native ops declared in csrc/op_schemas.h.  The autograd and torch.library
wiring lives once in ``contrastive_kernels._families``.

On CPU tensors the kernels run only under ``TRITON_INTERPRET=1`` (how CI checks them).
"""
