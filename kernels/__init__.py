"""Hand-written Triton kernels, each beside its PyTorch reference (imported as lad_fast.kernels)."""
