"""Hand-written Triton kernels, each beside its PyTorch reference (imported as ``lad_fast.kernels``).

Each op has ``<op>_ref`` (the CPU path and the test oracle) and a public ``<op>(..., impl="auto")``.
Triton is imported lazily: the package imports without it.
"""

from lad_fast.kernels.attention import attention, attention_ref
from lad_fast.kernels.conv3d import conv3d, conv3d_ref, norm_act_conv3d, norm_act_conv3d_ref
from lad_fast.kernels.vq_nearest import vq_nearest, vq_nearest_ref

__all__ = [
    "attention",
    "attention_ref",
    "conv3d",
    "conv3d_ref",
    "norm_act_conv3d",
    "norm_act_conv3d_ref",
    "vq_nearest",
    "vq_nearest_ref",
]
