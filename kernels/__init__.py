"""``tpo.kernels``: fused Triton kernels, each with a torch reference, an
autograd.Function and a functional API (one op per file)."""
