"""Saved styles: the trained network as a file, and rendering any image with it.

``stylefile`` (the safetensors style file: write, read, check) and
``rendering`` (one forward pass, blends of several styles, tiles for large
images). It may import the root modules and the layers below
(clipstyle.models, clipstyle.method, clipstyle.regions).
"""
