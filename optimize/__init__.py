"""cxrscale optimize stage."""
