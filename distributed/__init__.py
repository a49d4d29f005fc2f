"""cxrscale distributed stage."""
