"""Measuring results and speed: scores (``metrics``), contact sheets (``sheet``), benchmarks (``bench``).

It may import every layer below it (models, method, regions, styles, jobs);
only the faces import it.
"""
