"""fastguide.kernels: the guided-step reference (the spec) and the fused Triton kernel."""
