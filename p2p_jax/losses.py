"""pix2pix objectives: a GAN loss on discriminator logits plus a weighted L1.

Every loss is a mean over all logits (the reference's ``GANLoss``), computed in
float32 whatever the compute dtype.
"""

import jax.numpy as jnp

GAN_MODES = ("vanilla", "lsgan", "hinge")


def sigmoid_cross_entropy(logits, label: float):
  """Mean cross-entropy of sigmoid(logits) against a constant label.

  The stable form PyTorch's ``BCEWithLogitsLoss`` uses; exact log(2) at 0.
  """
  return jnp.mean(jnp.maximum(logits, 0) - logits * label + jnp.log1p(jnp.exp(-jnp.abs(logits))))


def _check_mode(gan_mode: str) -> None:
  if gan_mode not in GAN_MODES:
    raise ValueError(f"config.loss.gan_mode must be one of {GAN_MODES}, got {gan_mode!r}")


def discriminator_loss(real_logits, fake_logits, gan_mode: str = "vanilla"):
  """The discriminator's objective, halved as in the paper (section 3.3).

  Returns ``(loss, loss_on_real, loss_on_fake)``.
  """
  _check_mode(gan_mode)
  real_logits = real_logits.astype(jnp.float32)
  fake_logits = fake_logits.astype(jnp.float32)
  if gan_mode == "vanilla":
    real = sigmoid_cross_entropy(real_logits, 1.0)
    fake = sigmoid_cross_entropy(fake_logits, 0.0)
  elif gan_mode == "lsgan":
    real = jnp.mean(jnp.square(real_logits - 1.0))
    fake = jnp.mean(jnp.square(fake_logits))
  else:
    real = jnp.mean(jnp.maximum(0.0, 1.0 - real_logits))
    fake = jnp.mean(jnp.maximum(0.0, 1.0 + fake_logits))
  return 0.5 * (real + fake), real, fake


def generator_gan_loss(fake_logits, gan_mode: str = "vanilla"):
  """The generator's adversarial term; non-saturating for ``vanilla``."""
  _check_mode(gan_mode)
  fake_logits = fake_logits.astype(jnp.float32)
  if gan_mode == "vanilla":
    return sigmoid_cross_entropy(fake_logits, 1.0)
  if gan_mode == "lsgan":
    return jnp.mean(jnp.square(fake_logits - 1.0))
  return -jnp.mean(fake_logits)


def l1_loss(fake, target):
  return jnp.mean(jnp.abs(fake.astype(jnp.float32) - target.astype(jnp.float32)))
