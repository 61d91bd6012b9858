"""L1, PSNR and SSIM against hand-computed values and TensorFlow's tf.image.psnr / tf.image.ssim."""

import numpy as np
import pytest
import tensorflow as tf

from p2p_jax import metrics


def _images(seed, shape=(3, 24, 20, 3)):
  """Smooth images with noise, in [-1, 1]: SSIM is neither ~0 nor ~1 for a pair of them."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:shape[1], 0:shape[2]]
  base = np.sin(xx[None, ..., None] / (3 + np.arange(shape[0])[:, None, None, None]) + yy[..., None] / 5)
  return np.clip(0.8 * base + 0.2 * rng.uniform(-1, 1, shape), -1, 1).astype(np.float32)


def test_l1_and_psnr_known_values():
  target = np.zeros((2, 16, 16, 3), np.float32)
  generated = target.copy()
  generated[0] += 0.5  # |error| 0.5 in [-1, 1]; 0.25 in [0, 1]: MSE 1/16, PSNR 10 log10(16)
  np.testing.assert_allclose(metrics.l1(generated, target), [0.5, 0.0])
  psnr = np.asarray(metrics.psnr(generated, target))
  np.testing.assert_allclose(psnr[0], 10 * np.log10(16), rtol=1e-6)
  assert psnr[1] == np.inf


def test_psnr_and_ssim_match_tensorflow():
  generated, target = _images(0), _images(1)
  unit = lambda x: (x + 1) / 2
  expected_psnr = tf.image.psnr(unit(generated), unit(target), max_val=1.0).numpy()
  expected_ssim = tf.image.ssim(unit(generated), unit(target), max_val=1.0).numpy()
  values = metrics.image_metrics(generated, target)
  np.testing.assert_allclose(values["psnr"], expected_psnr, rtol=1e-5)
  np.testing.assert_allclose(values["ssim"], expected_ssim, rtol=1e-4, atol=1e-5)
  assert 0.1 < expected_ssim.min() and expected_ssim.max() < 0.95, "a pair that tests something"


def test_ssim_of_an_image_with_itself_is_one():
  images = _images(2)
  np.testing.assert_allclose(metrics.ssim(images, images), 1.0, rtol=1e-6)


def test_ssim_names_the_size_it_needs():
  small = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(ValueError, match=r"SSIM needs images of at least 11x11 pixels, got 8x8"):
    metrics.ssim(small, small)
