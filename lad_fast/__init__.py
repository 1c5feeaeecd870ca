"""lad-fast: Locality-Aware Diffusion (Lad, ACM MM 2024) for 3D abdominal CT.

Volumes are ``(B, C, D, H, W)`` tensors with D the axial (inferior-superior) axis; masks are integer
label maps ``(B, D, H, W)`` in the canonical organ vocabulary of :mod:`lad_fast.data.labels`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lad_fast.errors import LadFastError

__all__ = ["LadFastError", "__version__"]
