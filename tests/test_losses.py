"""The GAN objectives against their closed forms."""

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
  d_loss, real, fake = losses.discriminator_loss(REAL, FAKE, "vanilla")
  assert real == pytest.approx(_bce(REAL, 1), rel=1e-6)
  assert fake == pytest.approx(_bce(FAKE, 0), rel=1e-6)
  assert d_loss == pytest.approx(0.5 * (_bce(REAL, 1) + _bce(FAKE, 0)), rel=1e-6)
  assert losses.generator_gan_loss(FAKE, "vanilla") == pytest.approx(_bce(FAKE, 1), rel=1e-6)
  zero = jnp.zeros((1, 30, 30, 1))
  assert losses.discriminator_loss(zero, zero)[0] == pytest.approx(math.log(2), rel=1e-5)


def test_lsgan_is_halved_least_squares():
  d_loss, real, fake = losses.discriminator_loss(REAL, FAKE, "lsgan")
  assert real == pytest.approx(np.mean((np.asarray(REAL) - 1) ** 2))
  assert fake == pytest.approx(np.mean(np.asarray(FAKE) ** 2))
  assert d_loss == pytest.approx(0.5 * (real + fake))
  assert losses.generator_gan_loss(FAKE, "lsgan") == pytest.approx(np.mean((np.asarray(FAKE) - 1) ** 2))


def test_hinge():
  d_loss, real, fake = losses.discriminator_loss(REAL, FAKE, "hinge")
  assert real == pytest.approx(np.mean(np.maximum(0, 1 - np.asarray(REAL))))
  assert fake == pytest.approx(np.mean(np.maximum(0, 1 + np.asarray(FAKE))))
  assert d_loss == pytest.approx(0.5 * (real + fake))
  assert losses.generator_gan_loss(FAKE, "hinge") == pytest.approx(-np.mean(np.asarray(FAKE)))


def test_losses_are_float32_for_bfloat16_logits():
  d_loss, _, _ = losses.discriminator_loss(REAL.astype(jnp.bfloat16), FAKE.astype(jnp.bfloat16))
  assert d_loss.dtype == jnp.float32
  assert losses.l1_loss(REAL.astype(jnp.bfloat16), FAKE).dtype == jnp.float32


def test_l1():
  assert losses.l1_loss(REAL, FAKE) == pytest.approx(np.mean(np.abs(np.asarray(REAL) - np.asarray(FAKE))))


def test_unknown_gan_mode_is_named():
  with pytest.raises(ValueError, match=r"config.loss.gan_mode must be one of .*got 'wgan'"):
    losses.discriminator_loss(REAL, FAKE, "wgan")
  with pytest.raises(ValueError, match="got 'wgan'"):
    losses.generator_gan_loss(FAKE, "wgan")
