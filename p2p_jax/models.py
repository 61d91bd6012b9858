"""The pix2pix networks: U-Net and ResNet generators, PatchGAN discriminators.

Layer for layer these are the networks of the PyTorch reference
(junyanz/pytorch-CycleGAN-and-pix2pix, ``models/networks.py``), so identical
weights give identical outputs and the parameter counts match exactly.
All modules take NHWC inputs and a ``train`` flag; batch statistics live in the
``batch_stats`` collection and dropout draws from the ``dropout`` RNG. A
generator's ``size_multiple`` is what its input sides must be a multiple of.
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from p2p_jax import layers

Dtype = Any
GENERATORS = ("unet", "resnet")
DISCRIMINATORS = ("patchgan",)


def _use_bias(norm: str) -> bool:
  # The reference's use_bias is true only for instance norm (which has no
  # affine shift); in front of batch norm, and with no norm at all, convs have
  # no bias (models/networks.py: use_bias = norm_layer.func == nn.InstanceNorm2d).
  return norm == "instance"


def relu_of_concatenation(skip, h):
  """``relu(concatenate([skip, h]))``, the next decoder block's input, as each half's ReLU concatenated.

  The same values; but of ``relu(concatenate(...))`` XLA keeps both the
  concatenation and its ReLU for the backward pass, while each half's ReLU
  needs only tensors that are kept anyway (the step's temporary buffers at 256
  px batch 16: 181 MiB less in float32, 228 in bf16; BENCHMARKS.md).
  """
  return jnp.concatenate([nn.relu(skip), nn.relu(h)], axis=-1)


class UNetGenerator(nn.Module):
  """The paper's U-Net (``unet_256`` for ``num_downs=8``, ``unet_128`` for 7).

  Encoder C64-C128-C256-C512-C512-C512-C512-C512 and the mirrored decoder with
  skip concatenations. As in the reference, the three decoder blocks after the
  innermost one use dropout 0.5, and because the reference's LeakyReLU is in
  place, the skip tensors carry the LeakyReLU'd encoder activations.
  """
  num_downs: int = 8
  ngf: int = 64
  out_channels: int = 3
  norm: str = "batch"
  use_dropout: bool = True
  conv_impl: str = "auto"
  upconv_impl: str = "auto"
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None

  @property
  def size_multiple(self) -> int:
    return 2 ** self.num_downs

  def _widths(self) -> Sequence[Tuple[int, int]]:
    """(outer, inner) channels of each block, outermost first."""
    g = self.ngf
    widths = [(self.out_channels, g), (g, 2 * g), (2 * g, 4 * g), (4 * g, 8 * g)]
    widths += [(8 * g, 8 * g)] * (self.num_downs - 4)
    return widths

  @nn.compact
  def __call__(self, x, train: bool):
    if self.num_downs < 5:
      raise ValueError(f"UNetGenerator needs num_downs >= 5, got {self.num_downs}")
    bias = _use_bias(self.norm)
    widths = self._widths()
    innermost = self.num_downs - 1
    h = x.astype(self.dtype or x.dtype)
    skips = []
    for i, (_, inner) in enumerate(widths):
      if i > 0:
        h = nn.leaky_relu(h, 0.2)
        skips.append(h)
      h = layers.Conv(inner, 4, 2, 1, use_bias=bias, impl=self.conv_impl, name=f"down_{i}", dtype=self.dtype)(h)
      if 0 < i < innermost:
        h = layers.Norm(self.norm, self.axis_name, name=f"down_norm_{i}")(h, train)
    h = nn.relu(h)
    for i in reversed(range(self.num_downs)):
      outer, _ = widths[i]
      h = layers.ConvTranspose(outer, use_bias=(i == 0) or bias, impl=self.upconv_impl, name=f"up_{i}",
                               dtype=self.dtype)(h)
      if i == 0:
        return jnp.tanh(h.astype(jnp.float32))
      h = layers.Norm(self.norm, self.axis_name, name=f"up_norm_{i}")(h, train)
      if self.use_dropout and 4 <= i < innermost:
        h = nn.Dropout(0.5, deterministic=not train)(h)
      h = relu_of_concatenation(skips[i - 1], h)


class ResnetGenerator(nn.Module):
  """The reference's ResNet generator (``resnet_9blocks`` / ``resnet_6blocks``)."""
  n_blocks: int = 9
  ngf: int = 64
  out_channels: int = 3
  norm: str = "batch"
  use_dropout: bool = True
  conv_impl: str = "auto"
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None
  size_multiple = 4  # Two stride-2 convolutions down, two transposed ones up.

  @nn.compact
  def __call__(self, x, train: bool):
    bias = _use_bias(self.norm)
    norm = lambda name: layers.Norm(self.norm, self.axis_name, name=name)
    h = layers.reflect_pad(x.astype(self.dtype or x.dtype), 3)
    h = layers.Conv(self.ngf, 7, 1, 0, bias, impl=self.conv_impl, name="stem", dtype=self.dtype)(h)
    h = nn.relu(norm("stem_norm")(h, train))
    for i in range(2):
      h = layers.Conv(self.ngf * 2 ** (i + 1), 3, 2, 1, bias, impl=self.conv_impl, name=f"down_{i}", dtype=self.dtype)(h)
      h = nn.relu(norm(f"down_norm_{i}")(h, train))
    width = h.shape[-1]
    for b in range(self.n_blocks):
      y = layers.reflect_pad(h, 1)
      y = layers.Conv(width, 3, 1, 0, bias, impl=self.conv_impl, name=f"block_{b}_conv_0", dtype=self.dtype)(y)
      y = nn.relu(norm(f"block_{b}_norm_0")(y, train))
      if self.use_dropout:
        y = nn.Dropout(0.5, deterministic=not train)(y)
      y = layers.reflect_pad(y, 1)
      y = layers.Conv(width, 3, 1, 0, bias, impl=self.conv_impl, name=f"block_{b}_conv_1", dtype=self.dtype)(y)
      h = h + norm(f"block_{b}_norm_1")(y, train)
    for i in range(2):
      h = layers.ConvTranspose(self.ngf * 2 ** (1 - i), kernel_size=3, stride=2, padding=1,
                               output_padding=1, use_bias=bias, name=f"up_{i}", dtype=self.dtype)(h)
      h = nn.relu(norm(f"up_norm_{i}")(h, train))
    h = layers.reflect_pad(h, 3)
    h = layers.Conv(self.out_channels, 7, 1, 0, True, impl=self.conv_impl, name="head", dtype=self.dtype)(h)
    return jnp.tanh(h.astype(jnp.float32))


def patch_layers(n_layers: int, ndf: int = 64):
  """The discriminator's conv stack as (features, kernel, stride, padding, normed).

  ``n_layers=0`` is the 1x1 PixelGAN, 1 the 16x16, 3 the 70x70 PatchGAN and 5
  the 286x286 ImageGAN of the paper's ablation (for 256x256 inputs).
  """
  if n_layers == 0:
    return [(ndf, 1, 1, 0, False), (2 * ndf, 1, 1, 0, True), (1, 1, 1, 0, False)]
  spec = [(ndf, 4, 2, 1, False)]
  spec += [(ndf * min(2 ** n, 8), 4, 2, 1, True) for n in range(1, n_layers)]
  spec += [(ndf * min(2 ** n_layers, 8), 4, 1, 1, True), (1, 4, 1, 1, False)]
  return spec


def receptive_field(n_layers: int) -> int:
  """Side of the input patch that one output logit of the discriminator sees."""
  field = 1
  for _, kernel, stride, _, _ in reversed(patch_layers(n_layers)):
    field = (field - 1) * stride + kernel
  return field


def patch_output_size(n_layers: int, size: int) -> int:
  """Side of the logit map for a ``size`` x ``size`` input."""
  for _, kernel, stride, padding, _ in patch_layers(n_layers):
    size = (size + 2 * padding - kernel) // stride + 1
  return size


class PatchDiscriminator(nn.Module):
  """The conditional PatchGAN: classifies each patch of the (source, target) pair.

  Each hidden layer's activation is sown into ``intermediates`` as
  ``features_<i>``, for generator terms such as feature matching.
  """
  n_layers: int = 3
  ndf: int = 64
  norm: str = "batch"
  conv_impl: str = "auto"
  axis_name: Optional[str] = None
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, a, b, train: bool):
    h = jnp.concatenate([a, b], axis=-1).astype(self.dtype or a.dtype)
    spec = patch_layers(self.n_layers, self.ndf)
    for i, (features, kernel, stride, padding, normed) in enumerate(spec):
      last = i == len(spec) - 1
      # Biases where the reference has them: the first and last conv of the
      # PatchGAN always, the PixelGAN's first always; elsewhere only with
      # instance norm.
      bias = _use_bias(self.norm) or i == 0 or (last and self.n_layers > 0)
      h = layers.Conv(features, kernel, stride, padding, bias, impl=self.conv_impl, name=f"conv_{i}", dtype=self.dtype)(h)
      if last:
        return h.astype(jnp.float32)
      if normed:
        h = layers.Norm(self.norm, self.axis_name, name=f"norm_{i}")(h, train)
      h = nn.leaky_relu(h, 0.2)
      self.sow("intermediates", f"features_{i}", h)


def size_multiple(model: ml_collections.ConfigDict) -> int:
  """What the sides of the built-in generator of ``model`` must be a multiple of (1 for others)."""
  if model.generator == "unet":
    return 2 ** model.num_downs
  if model.generator == "resnet":
    return ResnetGenerator.size_multiple
  return 1


def make_generator(model: ml_collections.ConfigDict, out_channels: int,
                   axis_name: Optional[str] = None) -> nn.Module:
  """The built-in generator named by ``model.generator`` (``unet`` or ``resnet``)."""
  common = dict(ngf=model.ngf, out_channels=out_channels, norm=model.norm, use_dropout=model.use_dropout,
                conv_impl=model.conv_impl, axis_name=axis_name, dtype=jnp.dtype(model.dtype))
  if model.generator == "unet":
    return UNetGenerator(num_downs=model.num_downs, upconv_impl=model.upconv_impl, **common)
  if model.generator == "resnet":
    return ResnetGenerator(n_blocks=model.n_blocks, **common)
  raise ValueError(f"config.model.generator={model.generator!r} is none of the built-in generators "
                   f"{GENERATORS}.")


def make_discriminator(model: ml_collections.ConfigDict, axis_name: Optional[str] = None) -> nn.Module:
  """The built-in discriminator, the PatchGAN with ``model.n_layers_d`` layers."""
  return PatchDiscriminator(n_layers=model.n_layers_d, ndf=model.ndf, norm=model.norm,
                            conv_impl=model.conv_impl, axis_name=axis_name, dtype=jnp.dtype(model.dtype))
