"""TRELLIS image-to-3D canonical stage in plain PyTorch (specified in docs/trellis.md)."""
