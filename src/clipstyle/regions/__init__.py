"""Where the style goes: masks from files (``--mask``) or from words (``--where``), colour keeping.

``region`` (what the user asked for, checked and recorded), ``masks`` (reading
masks and mask maths: resize, feather, the final composite), ``where`` (a
phrase's region from CLIP's dense patch embeddings), ``guided`` (the guided
filter that snaps a coarse mask to the photo's edges), ``colour``
(``--preserve-color``: luma and chroma) and ``cache`` (the masks of a run's
photos). It may import the root modules, clipstyle.models and clipstyle.method.
"""
