"""irtf-jax: image retrieval with text feedback in JAX/Flax, with Gradient Augmentation."""

__version__ = "0.1.0"
