"""Measuring results and speed: scores (``metrics``), a film's flicker (``flicker``), contact sheets
(``sheet``), benchmarks (``bench``).

It may import every layer below it (models, method, regions, styles, jobs);
only the faces import it.
"""
