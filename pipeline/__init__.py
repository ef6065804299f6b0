"""Inference, above models/ and datasets/: video input and matting, canonical sources, alignment, the motion stage,
outputs and ground-truth scoring. `from pipeline import VideoTo4D` is the Python API (pipeline/video_to_4d.py)."""


def __getattr__(name):  # loaded on first use: `import pipeline.matting` need not import every model
    if name in ("VideoTo4D", "Result"):
        from pipeline import video_to_4d
        return getattr(video_to_4d, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
