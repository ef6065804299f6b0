"""The published render rig, in plain numbers (no torch: the Blender renderer imports it in its own venv).

utils/cameras.py builds torch cameras from it for the CPU renderer, training and inference;
data_rendering/blender_render.py builds Blender cameras from it. One owner, so the two renderers cannot drift apart.
"""
from __future__ import annotations

import math

TRAIN_RADIUS = 2.0
"""Camera distance of every training render and of the inference orbit."""
LENS_MM, SENSOR_MM = 50.0, 36.0
"""Blender's default camera."""
BLENDER_DEFAULT_FOV = 2.0 * math.atan(0.5 * SENSOR_MM / LENS_MM)
"""x_fov in radians (≈ 0.6911, 39.6°) of that camera: the training renders'."""

_S = math.sqrt(0.5)
PUBLISHED_VIEW_NAMES = ("front", "back", "left", "right", "front_right", "front_left", "back_left", "back_right")
PUBLISHED_DIRECTIONS = ((0.0, -1.0, 0.0), (0.0, 1.0, 0.0), (-1.0, 0.0, 0.0), (1.0, 0.0, 0.0),
                        (_S, -_S, 0.0), (-_S, -_S, 0.0), (-_S, _S, 0.0), (_S, _S, 0.0))
"""Unit directions of the fixed views 0..7, in the order of PUBLISHED_VIEW_NAMES (front is -Y, world Z up)."""
POLAR_RANGE_DEG = (75.0, 135.0)
"""Views past the fixed ones draw azimuth U[0°, 360°) and the polar angle from +Z uniformly in this range."""
