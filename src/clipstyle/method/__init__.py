"""The paper's method: the U-Net, the losses, the crops and the optimisation loop.

``unet`` (the StyleNet trained per image), ``losses`` (small pure functions on
tensors), ``augment`` (perspective crops), ``rejection`` (threshold rejection's
two CLIP paths), ``masked`` (what the loop does with a region's mask), ``text``
(prompt embeddings), ``loop`` (stylize_many: the optimisation itself) and
``stylize`` (the one-photo convenience entry that loads the default models).
It imports the root modules and clipstyle.models only: never the job
machinery (inputs, outputs, claims, reports, executors) or a face (CLI, web).
"""
