"""Animated models of Debian game-data packages as prepared training samples (`python -m data_rendering.game_assets`,
docs/real_data.md).

Formats: md2.py (MD2 + UFO:AI .anm), g3d.py (Glest G3D v4), iqm.py (IQM v2 + linear-blend skinning), on binary.py's
bounds-checked reads. Packages: ufoai.py, megaglest.py, cube2.py say where each keeps its models and clips
(catalogue.py: the shared types); assemble.py merges a model's parts and their images into one textured mesh.
packages.py fetches and unpacks the .deb files, copyright.py reads their licences, split.py splits by model, and
__main__.py is the command. bundle.py packs the accepted clips into one small file (`--bundle`) and unbundle.py turns
it into the prepared samples on a machine without the packages.
"""
