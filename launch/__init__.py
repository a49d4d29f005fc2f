"""cxrscale launch stage."""
