"""Per-image L1, PSNR and SSIM of generated images against their targets.

Images are NHWC in [-1, 1], the generator's range. L1 is measured there (the
units of the training loss ``g_l1``); PSNR and SSIM on the images mapped to
[0, 1] with a peak value of 1, which equals PSNR and SSIM on 8-bit images
with a peak of 255 (up to rounding). SSIM is Wang et al. (2004) as
``tf.image.ssim`` computes it: an 11x11 Gaussian window (sigma 1.5), K1=0.01,
K2=0.03, valid positions only, averaged over positions and channels.
"""

from typing import Dict

import jax
import jax.numpy as jnp

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _to_unit_range(images):
  return (images.astype(jnp.float32) + 1.0) / 2.0


def l1(generated, target):
  """Mean absolute error per image, in [-1, 1] units."""
  return jnp.mean(jnp.abs(generated - target), axis=(-3, -2, -1))


def psnr(generated, target):
  """Peak signal-to-noise ratio per image in dB (inf where the images are equal)."""
  mse = jnp.mean((_to_unit_range(generated) - _to_unit_range(target)) ** 2, axis=(-3, -2, -1))
  return -10.0 * jnp.log10(mse)


def _gaussian_window():
  x = jnp.arange(SSIM_WINDOW, dtype=jnp.float32) - (SSIM_WINDOW - 1) / 2
  g = jnp.exp(-x ** 2 / (2 * SSIM_SIGMA ** 2))
  return g / jnp.sum(g)


def _local_mean(images):
  """The Gaussian-weighted mean over each valid 11x11 window, per channel (separable)."""
  g = _gaussian_window()
  n, h, w, c = images.shape
  x = jnp.moveaxis(images, -1, 1).reshape(n * c, 1, h, w)
  dims = ("NCHW", "OIHW", "NCHW")
  x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, -1, 1), (1, 1), "VALID", dimension_numbers=dims)
  x = jax.lax.conv_general_dilated(x, g.reshape(1, 1, 1, -1), (1, 1), "VALID", dimension_numbers=dims)
  return jnp.moveaxis(x.reshape(n, c, *x.shape[2:]), 1, -1)


def ssim(generated, target):
  """Structural similarity per image, in [-1, 1] (1 where the images are equal)."""
  if min(generated.shape[-3:-1]) < SSIM_WINDOW:
    raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got "
                     f"{generated.shape[-3]}x{generated.shape[-2]}.")
  x, y = _to_unit_range(generated), _to_unit_range(target)
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  mean_x, mean_y = _local_mean(x), _local_mean(y)
  mean_xy = 2 * mean_x * mean_y
  mean_sq = mean_x ** 2 + mean_y ** 2
  luminance = (mean_xy + c1) / (mean_sq + c1)
  structure = (2 * _local_mean(x * y) - mean_xy + c2) / (_local_mean(x * x + y * y) - mean_sq + c2)
  return jnp.mean(luminance * structure, axis=(-3, -2, -1))


@jax.jit
def image_metrics(generated, target) -> Dict[str, jax.Array]:
  """``{"l1", "psnr", "ssim"}``, one value per image."""
  return {"l1": l1(generated, target), "psnr": psnr(generated, target),
          "ssim": ssim(generated, target)}
