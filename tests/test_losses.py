"""The GAN objectives against their closed forms, and the generator's L1 term."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import losses

REAL = jnp.array([[2.0, -1.0], [0.5, 0.0]])
FAKE = jnp.array([[-3.0, 1.0], [0.0, 0.25]])


def _bce(logits, label):
  p = 1 / (1 + np.exp(-np.asarray(logits, np.float64)))
  return float(np.mean(-(label * np.log(p) + (1 - label) * np.log(1 - p))))


def test_vanilla_is_halved_cross_entropy_and_non_saturating_for_g():
  d_loss, real, fake = losses.discriminator_loss(losses.vanilla, REAL, FAKE)
  assert real == pytest.approx(_bce(REAL, 1), rel=1e-6)
  assert fake == pytest.approx(_bce(FAKE, 0), rel=1e-6)
  assert d_loss == pytest.approx(0.5 * (_bce(REAL, 1) + _bce(FAKE, 0)), rel=1e-6)
  assert losses.generator_gan_loss(losses.vanilla, FAKE) == pytest.approx(_bce(FAKE, 1), rel=1e-6)
  zero = jnp.zeros((1, 30, 30, 1))
  assert losses.discriminator_loss(losses.vanilla, zero, zero)[0] == pytest.approx(math.log(2), rel=1e-5)


def test_lsgan_is_halved_least_squares():
  d_loss, real, fake = losses.discriminator_loss(losses.lsgan, REAL, FAKE)
  assert real == pytest.approx(np.mean((np.asarray(REAL) - 1) ** 2))
  assert fake == pytest.approx(np.mean(np.asarray(FAKE) ** 2))
  assert d_loss == pytest.approx(0.5 * (real + fake))
  assert losses.generator_gan_loss(losses.lsgan, FAKE) == pytest.approx(np.mean((np.asarray(FAKE) - 1) ** 2))


def test_hinge():
  d_loss, real, fake = losses.discriminator_loss(losses.hinge, REAL, FAKE)
  assert real == pytest.approx(np.mean(np.maximum(0, 1 - np.asarray(REAL))))
  assert fake == pytest.approx(np.mean(np.maximum(0, 1 + np.asarray(FAKE))))
  assert d_loss == pytest.approx(0.5 * (real + fake))
  assert losses.generator_gan_loss(losses.hinge, FAKE) == pytest.approx(-np.mean(np.asarray(FAKE)))
  with pytest.raises(ValueError, match="the hinge loss's generator side only has a 'real' target"):
    losses.hinge(FAKE, target_is_real=False, for_discriminator=False)


def test_wgangp_is_the_references_critic_loss_without_a_penalty():
  """GANLoss('wgangp'): -mean for real targets, mean for fake ones; the D loss halved as for the others."""
  d_loss, real, fake = losses.discriminator_loss(losses.wgangp, REAL, FAKE)
  assert real == pytest.approx(-np.mean(np.asarray(REAL)))
  assert fake == pytest.approx(np.mean(np.asarray(FAKE)))
  assert d_loss == pytest.approx(0.5 * (real + fake))
  assert losses.generator_gan_loss(losses.wgangp, FAKE) == pytest.approx(-np.mean(np.asarray(FAKE)))


@pytest.mark.parametrize("gan_loss", list(losses.GAN_LOSSES.values()))
def test_a_pytree_of_logits_is_the_mean_of_each_maps_loss(gan_loss):
  """As a multi-scale discriminator returns: each map counts once, whatever its size."""
  small, large = REAL[:1, :1], jnp.tile(FAKE, (3, 3))
  for target, for_d in ((True, True), (False, True), (True, False)):
    expected = 0.5 * (gan_loss(small, target, for_d) + gan_loss(large, target, for_d))
    assert gan_loss([small, {"large": large}], target, for_d) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("gan_loss", list(losses.GAN_LOSSES.values()))
def test_losses_are_float32_for_bfloat16_logits(gan_loss):
  d_loss, _, _ = losses.discriminator_loss(gan_loss, REAL.astype(jnp.bfloat16), FAKE.astype(jnp.bfloat16))
  assert d_loss.dtype == jnp.float32


def _inputs(fake, target):
  return losses.LossInputs(source=target, target=target, fake=fake, fake_logits=None, fake_features={},
                           discriminate=None)


def test_l1():
  assert losses.l1(_inputs(REAL, FAKE)) == pytest.approx(np.mean(np.abs(np.asarray(REAL) - np.asarray(FAKE))))
  assert losses.l1(_inputs(REAL.astype(jnp.bfloat16), FAKE)).dtype == jnp.float32
