"""Building blocks shared by the generators and the discriminator.

They follow the PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix) closely
enough that identical weights give identical outputs: kernels are stored HWIO,
transposed-convolution kernels as ``(kh, kw, in, out)`` (PyTorch's
``ConvTranspose2d.weight`` is ``(in, out, kh, kw)``), and batch norm keeps the
unbiased running variance that PyTorch keeps.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# The reference's init_weights('normal', 0.02): conv kernels N(0, 0.02),
# norm scales N(1, 0.02), biases 0.
conv_init = nn.initializers.normal(stddev=0.02)


def scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class BatchNorm(nn.Module):
  """Batch norm over N, H, W with PyTorch's semantics.

  With ``use_running_average=False`` it normalises with the statistics of the
  batch (synchronised over ``axis_name`` when given). The running averages in
  the ``batch_stats`` collection are updated only when that collection is
  mutable, so the paper's test-time mode (batch statistics of the test batch,
  section 3.3) is simply ``train=True`` without ``mutable=["batch_stats"]``.
  """
  momentum: float = 0.1  # PyTorch convention: weight of the new batch.
  epsilon: float = 1e-5
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    features = x.shape[-1]
    scale = self.param("scale", scale_init, (features,))
    bias = self.param("bias", nn.initializers.zeros, (features,))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(xf, axes)
      mean_sq = jnp.mean(jnp.square(xf), axes)
      count = x.size // features
      if self.axis_name is not None:
        mean, mean_sq = lax.pmean((mean, mean_sq), self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
      if self.is_mutable_collection("batch_stats") and not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    y = (x.astype(jnp.float32) - mean) * lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(x.dtype)


class Norm(nn.Module):
  """The norm layer chosen by name: ``batch``, ``instance`` or ``none``."""
  kind: str = "batch"
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "batch":
      return BatchNorm(axis_name=self.axis_name, name="bn")(x, use_running_average=not train)
    if self.kind == "instance":
      # The reference's InstanceNorm2d: no affine parameters, no running stats.
      return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, name="in")(x)
    if self.kind == "none":
      return x
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {self.kind!r}")


def conv(features: int, kernel: int, stride: int, padding: int, use_bias: bool, name=None, dtype=None):
  """A PyTorch-style Conv2d (symmetric zero padding) with the reference init."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)), use_bias=use_bias,
                 kernel_init=conv_init, dtype=dtype, name=name)


def conv_transpose(x, kernel, stride: int, padding: int, output_padding: int = 0):
  """PyTorch's ``ConvTranspose2d`` as one dilated convolution (XLA's own lowering).

  ``kernel`` is ``(kh, kw, in, out)``: each input pixel scatters ``kernel``
  into the output at ``stride * i + k - padding``.
  """
  k = kernel.shape[0]
  lo, hi = k - 1 - padding, k - 1 - padding + output_padding
  return lax.conv_general_dilated(
      x, jnp.flip(kernel, (0, 1)), window_strides=(1, 1), padding=((lo, hi), (lo, hi)),
      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvTranspose(nn.Module):
  """A PyTorch-style ``ConvTranspose2d`` with the reference init."""
  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  output_padding: int = 0
  use_bias: bool = False
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    dtype = self.dtype or x.dtype
    y = conv_transpose(x.astype(dtype), kernel.astype(dtype), self.stride, self.padding, self.output_padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,)).astype(dtype)
    return y


def reflect_pad(x, pad: int):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
