"""TRELLIS image-to-3D canonical stage in plain PyTorch (spec: shared/reference/trellis_spec.md)."""
