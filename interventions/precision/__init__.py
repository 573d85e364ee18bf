"""Per-request weight precision: a request's matmuls may use an FP4 (NVFP4 / MXFP4) copy of the weights."""
