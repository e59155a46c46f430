"""The frozen encoders: CLIP's image and text towers and VGG-19, their weights and loading.

``encoders`` wraps each network with its own preprocessing (eval mode, no
gradients, named features); ``vit`` is a faster exact forward pass of CLIP's
ViT image tower; ``weights`` reads weight files safely (never running their
code); ``loading`` finds, fetches and loads the weights. This layer imports
only the root modules (config, errors, device...); nothing above it.
"""
