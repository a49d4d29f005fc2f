"""cxrscale benchmarks stage."""
