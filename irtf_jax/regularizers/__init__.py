"""Gradient Augmentation (GA) regularizers and the FGSM baseline (jax + optax).

Huang, Zhang, Zhou, Gao, "Adversarial and Isotropic Gradient Augmentation for
Image Retrieval with Text Feedback", IEEE TMM 25 (2023) 7415-7427:

* explicit adversarial GA, `adversarial_gradient_penalty`: a loss wrapper
  adding `(eps / 2) * ||dL/dx||_q` (`adversarial.py`);
* implicit isotropic GA, `isotropic_gradient_augmentation`: an optax
  transformation adding isotropic noise to the gradient (`isotropic.py`),
  drawn by the samplers of `sampling.py`;
* `fgsm_adversarial_loss`: FGSM adversarial training, the baseline the
  adversarial penalty approximates.

This package imports nothing from the rest of irtf_jax, so it can be lifted
into any JAX/optax training loop.
"""

from irtf_jax.regularizers.adversarial import AdversarialTerms
from irtf_jax.regularizers.adversarial import adversarial_gradient_penalty
from irtf_jax.regularizers.adversarial import dual_norm_penalty
from irtf_jax.regularizers.adversarial import fgsm_adversarial_loss
from irtf_jax.regularizers.isotropic import IsotropicGradientAugmentationState
from irtf_jax.regularizers.isotropic import isotropic_gradient_augmentation
from irtf_jax.regularizers.isotropic import isotropic_noise
from irtf_jax.regularizers.isotropic import leaf_weights
from irtf_jax.regularizers.sampling import hashed_bits
from irtf_jax.regularizers.sampling import hashed_normal
from irtf_jax.regularizers.sampling import normal_sampler

__all__ = [
    "AdversarialTerms",
    "IsotropicGradientAugmentationState",
    "adversarial_gradient_penalty",
    "dual_norm_penalty",
    "fgsm_adversarial_loss",
    "hashed_bits",
    "hashed_normal",
    "isotropic_gradient_augmentation",
    "isotropic_noise",
    "leaf_weights",
    "normal_sampler",
]
