"""pix2pix objectives: GAN losses on discriminator logits, and the generator's other terms.

A GAN loss is a plain function ``gan_loss(logits, target_is_real, for_discriminator)``
returning a float32 scalar: the reference's ``GANLoss`` convention
(``criterion(prediction, target_is_real)``), with SPADE's ``for_discriminator``
for the losses whose generator side differs (hinge). ``logits`` may be one array
or any pytree of them (the maps of a multi-scale discriminator, say): the loss is
the mean of each leaf's loss.

A generator term is a plain function of ``LossInputs`` returning a scalar; the
step adds ``weight * term(inputs)`` to the generator's adversarial loss for every
``(weight, term)`` in ``Pix2Pix.g_losses``. The reference's L1 is ``l1``.
"""

import dataclasses
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp

GANLoss = Callable[[Any, bool, bool], jax.Array]


def sigmoid_cross_entropy(logits, label: float):
  """Mean cross-entropy of sigmoid(logits) against a constant label.

  The stable form PyTorch's ``BCEWithLogitsLoss`` uses; exact log(2) at 0.
  """
  return jnp.mean(jnp.maximum(logits, 0) - logits * label + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _mean_over_leaves(logits, loss_of_array) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(logits)
  return sum(loss_of_array(leaf.astype(jnp.float32)) for leaf in leaves) / len(leaves)


def vanilla(logits, target_is_real: bool, for_discriminator: bool = True) -> jax.Array:
  """The paper's cross-entropy GAN loss; for the generator the non-saturating form."""
  del for_discriminator  # The generator's target is "real": -log D(G(x)).
  label = 1.0 if target_is_real else 0.0
  return _mean_over_leaves(logits, lambda x: sigmoid_cross_entropy(x, label))


def lsgan(logits, target_is_real: bool, for_discriminator: bool = True) -> jax.Array:
  """Least squares (Mao et al. 2017): the mean squared distance to the label."""
  del for_discriminator
  label = 1.0 if target_is_real else 0.0
  return _mean_over_leaves(logits, lambda x: jnp.mean(jnp.square(x - label)))


def hinge(logits, target_is_real: bool, for_discriminator: bool = True) -> jax.Array:
  """Hinge loss: max(0, 1 -+ D) for the discriminator, -D for the generator."""
  if not for_discriminator:
    if not target_is_real:
      raise ValueError("the hinge loss's generator side only has a 'real' target")
    return _mean_over_leaves(logits, lambda x: -jnp.mean(x))
  sign = -1.0 if target_is_real else 1.0
  return _mean_over_leaves(logits, lambda x: jnp.mean(jnp.maximum(0.0, 1.0 + sign * x)))


def wgangp(logits, target_is_real: bool, for_discriminator: bool = True) -> jax.Array:
  """The reference's ``wgangp`` mode: -mean(D) for real targets, mean(D) for fake ones.

  pix2pix applies no gradient penalty (the reference computes one only for
  CycleGAN's discriminators), so neither does the step.
  """
  del for_discriminator
  sign = -1.0 if target_is_real else 1.0
  return _mean_over_leaves(logits, lambda x: sign * jnp.mean(x))


GAN_LOSSES = {"vanilla": vanilla, "lsgan": lsgan, "hinge": hinge, "wgangp": wgangp}


def discriminator_loss(gan_loss: GANLoss, real_logits, fake_logits) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The discriminator's objective, halved as in the paper (section 3.3).

  Returns ``(loss, loss_on_real, loss_on_fake)``.
  """
  real = gan_loss(real_logits, True, True)
  fake = gan_loss(fake_logits, False, True)
  return 0.5 * (real + fake), real, fake


def generator_gan_loss(gan_loss: GANLoss, fake_logits) -> jax.Array:
  """The generator's adversarial term: its fakes judged against the 'real' target."""
  return gan_loss(fake_logits, True, False)


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a generator term sees: the batch, the generator's output and the discriminator's view.

  ``fake_features`` is the discriminator's ``intermediates`` collection on the
  (source, fake) pair (what its modules ``sow``; the built-in PatchGAN sows each
  layer's activation). ``discriminate(image)`` runs the discriminator, after
  this step's update, on (source, image) and returns ``(logits, features)``;
  gradients flow through it, and the running batch statistics it computes are
  discarded. The step computes nothing a term does not use.
  """
  source: jax.Array
  target: jax.Array
  fake: jax.Array
  fake_logits: Any
  fake_features: Any
  discriminate: Callable[[jax.Array], Tuple[Any, Any]]


def l1(inputs: LossInputs) -> jax.Array:
  """The reference's L1 between the generated and the target image, in [-1, 1] units."""
  return jnp.mean(jnp.abs(inputs.fake.astype(jnp.float32) - inputs.target.astype(jnp.float32)))
