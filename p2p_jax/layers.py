"""Building blocks shared by the generators and the discriminator.

They follow the PyTorch reference (junyanz/pytorch-CycleGAN-and-pix2pix) closely
enough that identical weights give identical outputs: kernels are stored HWIO,
transposed-convolution kernels as ``(in, kh, kw, out)`` (PyTorch's
``ConvTranspose2d.weight`` is ``(in, out, kh, kw)``; with ``in`` first, the
matmul formulation reads the kernel as one ``(in, kh*kw*out)`` matrix without
copying it), and batch norm keeps the unbiased running variance that PyTorch
keeps.
"""

import functools
import math
import operator
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from p2p_jax import tuning

# The reference's init_weights('normal', 0.02): conv kernels N(0, 0.02),
# norm scales N(1, 0.02), biases 0.
conv_init = nn.initializers.normal(stddev=0.02)


def scale_init(key, shape, dtype=jnp.float32):
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _batch_statistics(xf, axis_name: Optional[str]):
  """Mean and biased variance of ``xf`` over all axes but the last, and over ``axis_name``'s devices.

  Two passes: E[x^2] - E[x]^2 cancels catastrophically in float32 when a
  channel's mean is large against its spread, leaving an error that depends on
  the summation order (so on the device count) in the gradients.
  """
  axes = tuple(range(xf.ndim - 1))
  mean = jnp.mean(xf, axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(xf - mean), axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  return mean, var


def _normalized(x, mean, var, scale, bias, epsilon: float):
  return ((x.astype(jnp.float32) - mean) * lax.rsqrt(var + epsilon) * scale + bias).astype(x.dtype)


def _after(value, dependency):
  """``value``, computed only once ``dependency`` is: ``value`` plus zero, or a NaN where ``dependency``
  is one, which XLA cannot fold, so it neither schedules what reads it earlier nor finds it equal to the
  forward pass's ops. (``value + 0 * dependency`` did the same until XLA:CPU's fast math, which folds
  ``0 * v``, was on: then the recomputations ran in the forward pass and the chunks at once, holding
  1.7 times the temporaries at 256 px batch 4, BENCHMARKS.md.)"""
  return value + jnp.where(jnp.isnan(dependency), dependency, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_normalized(x, scale, bias, epsilon: float, axis_name: Optional[str]):
  """``(y, mean, var)``: ``x`` normalised with its batch statistics, and those statistics.

  Its gradient is autodiff's, but keeps only ``x`` (as PyTorch's batch norm
  does): autodiff of the formula keeps two float32 tensors of ``x``'s size,
  the centred and the normalised input.
  """
  mean, var = _batch_statistics(x.astype(jnp.float32), axis_name)
  return _normalized(x, mean, var, scale, bias, epsilon), mean, var


def _batch_normalized_fwd(x, scale, bias, epsilon, axis_name):
  y, mean, var = _batch_normalized(x, scale, bias, epsilon, axis_name)
  return (y, mean, var), (x, mean, var, scale)


def _batch_normalized_bwd(epsilon, axis_name, residuals, cotangents):
  x, mean, var, scale = residuals
  dy, dmean, dvar = (c.astype(jnp.float32) for c in cotangents)
  axes = tuple(range(x.ndim - 1))
  rstd = lax.rsqrt(var + epsilon)
  dbias = jnp.sum(dy, axes)
  # Centred before scaling: x * rstd - mean * rstd would cancel in float32
  # where a channel's mean is large against its spread. From a mean that
  # depends on dy; else XLA computes it in the forward pass, where its
  # operands are ready, and holds it for the backward pass: a second float32
  # tensor of x's size.
  centred = x.astype(jnp.float32) - _after(mean, dbias)
  dy_centred = jnp.sum(dy * centred, axes)
  dvar = dvar - 0.5 * rstd ** 3 * scale * dy_centred
  dmean = dmean - rstd * scale * dbias

  def statistics_tangent(dx):
    """The tangent of ``_batch_statistics`` at x, whose transpose takes the statistics' cotangents to x.

    Written out: ``jax.vjp`` of ``_batch_statistics`` would compute the
    statistics again, two more passes over x.
    """
    dmean_out = jnp.mean(dx, axes)
    if axis_name is not None:
      dmean_out = lax.pmean(dmean_out, axis_name)
    dvar_out = 2 * jnp.mean(centred * (dx - dmean_out), axes)
    if axis_name is not None:
      dvar_out = lax.pmean(dvar_out, axis_name)
    return dmean_out, dvar_out

  dx_statistics, = jax.linear_transpose(statistics_tangent, jax.ShapeDtypeStruct(x.shape, jnp.float32))(
      (dmean, dvar))
  dx = dy * scale * rstd + dx_statistics
  return dx.astype(x.dtype), rstd * dy_centred, dbias


_batch_normalized.defvjp(_batch_normalized_fwd, _batch_normalized_bwd)


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
      return _normalized(x, ra_mean.value, ra_var.value, scale, bias, self.epsilon)
    y, mean, var = _batch_normalized(x, scale, bias, self.epsilon, self.axis_name)
    if self.is_mutable_collection("batch_stats") and not self.is_initializing():
      count = x.size // features
      if self.axis_name is not None:
        count = count * lax.psum(1, self.axis_name)
      unbiased = var * (count / jnp.maximum(count - 1, 1))
      ra_mean.value = (1 - self.momentum) * ra_mean.value + self.momentum * mean
      ra_var.value = (1 - self.momentum) * ra_var.value + self.momentum * unbiased
    return y


class Norm(nn.Module):
  """The norm layer chosen by name: ``batch``, ``instance`` or ``none``."""
  kind: str = "batch"
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    if self.kind == "batch":
      return BatchNorm(axis_name=self.axis_name, name="bn")(x, use_running_average=not train)
    if self.kind == "instance":
      # The reference's InstanceNorm2d: no affine parameters, no running stats;
      # the variance in two passes, as BatchNorm's (E[x^2] - E[x]^2 cancels).
      return nn.InstanceNorm(epsilon=1e-5, use_scale=False, use_bias=False, use_fast_variance=False,
                             name="in")(x)
    if self.kind == "none":
      return x
    raise ValueError(f"norm must be 'batch', 'instance' or 'none', got {self.kind!r}")


def _pick(table, backend_default: str, side: int) -> str:
  """The first ``(largest input side, impl)`` row of this backend's table that fits ``side``."""
  for max_side, impl in table.get(jax.default_backend(), ()):
    if side <= max_side:
      return impl
  return backend_default


def _zero_pad(x, widths):
  """``x`` with ``(low, high)`` zeros on each axis: ``jnp.pad``'s constant mode as one ``lax.pad``,
  without the nested jit ``jnp.pad`` traces through (the networks trace at every start)."""
  return lax.pad(x, np.zeros((), x.dtype), [(low, high, 0) for low, high in widths])


def matmul(a, b):
  """``a @ b`` accumulated in (at least) float32 and rounded to ``a``'s dtype once.

  For bfloat16 on CPU the result stays float32 (the layers hand on float32
  there) and all three products of a training step run in the one form
  XLA:CPU gives the CPU's bf16 dot-product units (AVX512_BF16, AMX):
  ``_bf16_matmul``.
  """
  if _bf16_on_cpu(a.dtype):
    return _bf16_matmul(a.reshape(-1, a.shape[-1]), b).reshape(*a.shape[:-1], b.shape[-1])
  return jnp.dot(a, b, preferred_element_type=jnp.promote_types(a.dtype, jnp.float32)).astype(a.dtype)


def _bf16_on_cpu(dtype) -> bool:
  """Whether XLA:CPU's bf16 rules apply: products bf16 in one form, everything else float32."""
  return dtype == jnp.bfloat16 and jax.default_backend() == "cpu"


def _row_major_transpose(x):
  """``x.T`` as a row-major array of its own, which the product reading it cannot fold away.

  XLA gives a transpose a column-major layout, and XLA:CPU runs a bf16 product
  with a column-major operand in float32 (its YNNPACK dots take row-major
  operands only, ``IsDotSupportedByYnn``); a pad and a slice in between give
  the operand a row-major layout of its own, and survive XLA's simplifier
  (in bf16, which XLA converts around them; on ``_as_bits`` it removes them).
  """
  rows, columns = x.shape
  return lax.slice(_zero_pad(x.T, ((0, 1), (0, 0))), (0, 0), (columns, rows))


def _as_bits(x):
  """bf16 on CPU as its uint16 bit patterns, else ``x``: XLA:CPU runs a bf16 pad, slice or
  concatenation in float32 (a conversion each way and twice the bytes; im2col's patches took
  a tenth of the bf16 step at 256 px batch 16), but moves integers as they are."""
  return lax.bitcast_convert_type(x, jnp.uint16) if _bf16_on_cpu(x.dtype) else x


def _from_bits(bits, dtype):
  """``_as_bits``'s inverse."""
  return lax.bitcast_convert_type(bits, dtype) if bits.dtype != dtype else bits


def _moved(move: Callable, x):
  """``move(x)`` for a ``move`` that only moves elements (pads, slices, concatenations): on
  ``_as_bits(x)`` for bf16 on CPU, with ``move``'s transpose, in ``x``'s dtype, as its gradient."""
  if not _bf16_on_cpu(x.dtype):
    return move(x)
  return _moved_bits(move, jax.ShapeDtypeStruct(x.shape, x.dtype), x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _moved_bits(move, primal, x):
  del primal  # For the backward pass.
  return _from_bits(move(_as_bits(x)), x.dtype)


def _moved_bits_fwd(move, primal, x):
  return _moved_bits(move, primal, x), None


def _moved_bits_bwd(move, primal, _, dy):
  return jax.linear_transpose(move, primal)(dy.astype(primal.dtype))


_moved_bits.defvjp(_moved_bits_fwd, _moved_bits_bwd)


@jax.custom_vjp
def _bf16_matmul(a, b):
  """bf16 ``(m, k) @ (k, n)`` into float32, with both gradient products bf16 and row-major too."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32)


def _bf16_matmul_fwd(a, b):
  return _bf16_matmul(a, b), (a, b)


def _product(a, b):
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


def _bf16_matmul_bwd(residuals, dy):
  """``dy @ b.T`` and ``a.T @ dy``, each transposing whichever of its operands or its result
  is smaller (XLA:CPU's transposes are slow).

  Results are rounded to bf16, as autocast's are, before any transpose: XLA
  folds the transpose of a float32 product back into it, leaving a bf16 dot
  with a column-major operand, which XLA:CPU cannot run at all (UNIMPLEMENTED).
  """
  a, b = residuals
  dy = dy.astype(jnp.bfloat16)
  m, k = a.shape
  n = b.shape[1]
  t = _row_major_transpose
  da = _product(dy, t(b)) if k * n <= m * (n + k) else t(_product(b, t(dy)))
  db = _product(t(a), dy) if m * k <= n * (m + k) else t(_product(t(dy), a))
  return da, db


_bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _activation_dtype(dtype):
  """The dtype a layer computing in ``dtype`` hands on: float32 on CPU, where XLA computes
  bf16 elementwise ops (norms, activations) by converting to float32 and back."""
  return jnp.float32 if jax.default_backend() == "cpu" else dtype


def _hand_on(module: nn.Module, y, dtype):
  """A layer's output ``y`` in the dtype it hands on, plus its bias when it has one."""
  y = y.astype(_activation_dtype(dtype))
  if module.use_bias:
    y = y + module.param("bias", nn.initializers.zeros, (module.features,)).astype(y.dtype)
  return y


def _xla_conv_operands(x, kernel):
  """The operands of one of XLA's own convolutions: float32 for bf16 on CPU, where XLA
  converts each to float32 inside anyway and the bf16 step ran slower than float32's."""
  if _bf16_on_cpu(x.dtype):
    return x.astype(jnp.float32), kernel.astype(jnp.float32)
  return x, kernel


def conv_xla(x, kernel, stride: int, padding: int):
  """XLA's own NHWC convolution with symmetric zero padding."""
  x, kernel = _xla_conv_operands(x, kernel)
  return lax.conv_general_dilated(x, kernel, (stride, stride), ((padding, padding),) * 2,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def conv_matmul(x, kernel, stride: int, padding):
  """A convolution as one matmul, on whichever side of it the patch matrix is smaller.

  Input side (im2col): the kh*kw strided slices of the input side by side,
  times the ``(kh*kw*in, out)`` kernel. Output side: every input pixel times
  the ``(in, kh*kw*out)`` kernel, then each output sums its kh*kw taps: far
  less memory when ``out`` is small, as in the PatchGAN's 1-channel last
  layer. On XLA:CPU, using it for inputs of 32 px or less (the U-Net's inner
  layers, the PatchGAN's last two) makes the whole step faster than either
  formulation everywhere (BENCHMARKS.md). ``padding`` is one int, or
  ``(rows, columns)``.
  """
  kh, kw, cin, cout = kernel.shape
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  x = _moved(lambda t: _zero_pad(t, ((0, 0), (ph, ph), (pw, pw), (0, 0))), x)
  n, height, width, _ = x.shape
  out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1

  def window(t, i, j, first_channel, channels):
    """The output-sized window of ``t`` at offset (i, j), strided, of channels [first, first + channels)."""
    return lax.slice(t, (0, i, j, first_channel),
                     (n, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, first_channel + channels),
                     (1, stride, stride, 1))

  if not _on_output_side(x.shape, kernel.shape, stride):
    if stride == 1 or kh % stride or kw % stride:
      im2col = lambda t: lax.concatenate([window(t, i, j, 0, cin) for i in range(kh) for j in range(kw)], 3)
    else:
      im2col = functools.partial(_phase_patches, kernel_shape=(kh, kw), stride=stride, output_shape=(out_h, out_w))
    return matmul(_moved(im2col, x), kernel.reshape(kh * kw * cin, cout))
  taps = matmul(x, kernel.transpose(2, 0, 1, 3).reshape(cin, kh * kw * cout))  # channel (i * kw + j) * cout + c
  return functools.reduce(operator.add, (window(taps, i, j, (i * kw + j) * cout, cout)
                                         for i in range(kh) for j in range(kw)))


def _phase_patches(padded, kernel_shape, stride: int, output_shape):
  """The im2col patches of ``padded`` for a kernel whose sides are multiples of ``stride`` (> 1).

  Kernel row ``a = q * stride + p`` of output row ``i`` reads row ``i + q`` of
  phase ``p``: so the patches are the input as ``stride x stride`` phases,
  ``kh/stride * kw/stride`` shifted windows of them, and one transpose, which
  XLA:CPU writes in one pass. A concatenation of the ``kh * kw`` strided
  windows writes every window first (twice the patches at a time), then the
  patches: for 4x4/stride-2 layers, forward and both gradients, up to 1.3x
  the time (BENCHMARKS.md). At stride 1 the concatenation is the faster.
  """
  (kh, kw), (out_h, out_w) = kernel_shape, output_shape
  n, _, _, c = padded.shape
  qh, qw = kh // stride, kw // stride
  rows, columns = out_h + qh - 1, out_w + qw - 1
  phases = lax.slice(padded, (0, 0, 0, 0), (n, rows * stride, columns * stride, c)).reshape(
      n, rows, stride, columns, stride, c)
  shifted = jnp.stack([lax.slice(phases, (0, q, 0, r, 0, 0), (n, q + out_h, stride, r + out_w, stride, c))
                       for q in range(qh) for r in range(qw)])
  # (q, r, n, i, p, j, s, c) -> (n, i, j, a = q * stride + p, b = r * stride + s, c)
  return shifted.reshape(qh, qw, n, out_h, stride, out_w, stride, c).transpose(2, 3, 5, 0, 4, 1, 6, 7).reshape(
      n, out_h, out_w, kh * kw * c)


def _on_output_side(padded_shape, kernel_shape, stride: int) -> bool:
  """Whether ``conv_matmul`` multiplies on the output side of a (padded) input: when the patch
  matrix would be larger than the per-tap products."""
  kh, kw, cin, cout = kernel_shape
  _, height, width, _ = padded_shape
  out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
  return out_h * out_w * cin > height * width * cout


def _padded_bits(x, padding: int):
  """``_as_bits(x)`` with ``padding`` zeros around each image: what ``conv_taps`` slices its windows from."""
  return _zero_pad(_as_bits(x), ((0, 0), (padding, padding), (padding, padding), (0, 0)))


def _tap_window(bits, dtype, tap, kernel_width: int, rows: int, columns: int):
  """The ``rows x columns`` window under kernel tap ``tap`` (row-major, traced) of the input
  whose ``_as_bits`` are ``bits``, as ``(pixels, in)`` of ``dtype``."""
  window = lax.dynamic_slice(bits, (0, tap // kernel_width, tap % kernel_width, 0),
                             (bits.shape[0], rows, columns, bits.shape[3]))
  return _from_bits(window.reshape(-1, bits.shape[3]), dtype)


def _tap_output_dtype(dtype):
  """What ``matmul`` gives for operands of ``dtype``."""
  return jnp.float32 if _bf16_on_cpu(dtype) else dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_taps(x, kernel, padding: int):
  """A stride-1 convolution as one ``(pixels, in) @ (in, out)`` product per kernel tap, in a loop.

  ``conv_matmul``'s patch matrix is kh*kw times its input (16x for the
  PatchGAN's stride-1 4x4 layer) and stays live from the forward pass to the
  kernel's gradient: at 256 px, batch 16, that layer's patches and their
  gradient were the step's memory peak (BENCHMARKS.md). Here the forward pass
  adds each tap's window times that tap's kernel into the output, and the
  backward pass loops over the taps again from the input alone. The windows
  are sliced inside loops, not unrolled: XLA's CSE would find unrolled
  backward windows equal to the forward pass's and keep those instead.
  """
  kh, kw, cin, cout = kernel.shape
  bits = _padded_bits(x, padding)
  n, rows, columns = bits.shape[0], bits.shape[1] - kh + 1, bits.shape[2] - kw + 1
  taps = kernel.reshape(kh * kw, cin, cout)

  def add_tap(tap, y):
    product = matmul(_tap_window(bits, x.dtype, tap, kw, rows, columns),
                     lax.dynamic_index_in_dim(taps, tap, keepdims=False))
    return y + product.astype(jnp.float32)

  y = lax.fori_loop(0, kh * kw, add_tap, jnp.zeros((n * rows * columns, cout), jnp.float32))
  return y.reshape(n, rows, columns, cout).astype(_tap_output_dtype(x.dtype))


def _conv_taps_fwd(x, kernel, padding):
  return conv_taps(x, kernel, padding), (x, kernel)


def _conv_taps_bwd(padding, residuals, dy):
  """Each tap's gradients, from its window of the input: the input's added into its window, the kernel's set.

  The kernel's gradient multiplies each window transposed, ``(in, pixels)``:
  all of them are cut from one channels-first copy of the input, where
  ``matmul``'s own gradient would transpose every window again (for bf16 on
  CPU, as an array of its own: 2% of the bf16 step at 256 px batch 4). Both
  products are written out here, in ``matmul``'s form, so that no window is
  transposed in the loop.
  """
  x, kernel = residuals
  kh, kw, cin, cout = kernel.shape
  padded = _padded_bits(x, padding)
  channels_first = padded.transpose(3, 0, 1, 2)
  n, rows, columns, _ = dy.shape
  taps = kernel.reshape(kh * kw, cin, cout)
  dy = dy.reshape(-1, cout).astype(x.dtype)  # Both products in the layer's dtype, as matmul's gradient.

  def add_tap_gradients(tap, gradients):
    dx, dtaps = gradients
    row, column = tap // kw, tap % kw
    tap_kernel = lax.dynamic_index_in_dim(taps, tap, keepdims=False)
    dwindow = matmul(dy, _row_major_transpose(tap_kernel))
    window_t = lax.dynamic_slice(channels_first, (0, 0, row, column), (cin, n, rows, columns))
    dtap = matmul(_from_bits(window_t.reshape(cin, -1), x.dtype), dy)
    corner = (0, row, column, 0)
    dx_window = lax.dynamic_slice(dx, corner, (n, rows, columns, cin))
    dx = lax.dynamic_update_slice(dx, dx_window + dwindow.reshape(dx_window.shape).astype(dx.dtype), corner)
    return dx, lax.dynamic_update_index_in_dim(dtaps, dtap.astype(dtaps.dtype), tap, 0)

  zeros = (jnp.zeros(padded.shape, jnp.float32), jnp.zeros(taps.shape, jnp.float32))
  dx, dtaps = lax.fori_loop(0, kh * kw, add_tap_gradients, zeros)
  dx = lax.slice(dx, (0, padding, padding, 0), (n, padding + x.shape[1], padding + x.shape[2], cin))
  return dx.astype(x.dtype), dtaps.reshape(kernel.shape).astype(kernel.dtype)


conv_taps.defvjp(_conv_taps_fwd, _conv_taps_bwd)


def _tile_values(blocks, axis: int):
  """Winograd F(2, 2)'s input transform along ``axis`` of ``(..., tiles + 1, 2, ...)`` row pairs:
  each tile's three values ``(d0 - d1, d1, d2 - d1)`` from its rows ``2t, 2t + 1, 2t + 2``."""
  tiles = blocks.shape[axis] - 1
  this, following = (lax.slice_in_dim(blocks, start, start + tiles, axis=axis) for start in (0, 1))
  d0, d1 = (lax.index_in_dim(this, row, axis + 1, keepdims=False) for row in (0, 1))
  d2 = lax.index_in_dim(following, 0, axis + 1, keepdims=False)
  return jnp.stack([d0 - d1, d1, d2 - d1], axis + 1)


def _kernel_values(kernel, axis: int):
  """F(2, 2)'s kernel transform along ``axis`` (two taps): ``(g0, g0 + g1, g1)``."""
  g0, g1 = (lax.index_in_dim(kernel, tap, axis, keepdims=False) for tap in (0, 1))
  return jnp.stack([g0, g0 + g1, g1], axis)


def _output_values(products, axis: int):
  """F(2, 2)'s output transform along ``axis`` (three values): the tile's outputs ``(m0 + m1, m1 + m2)``."""
  m0, m1, m2 = (lax.index_in_dim(products, i, axis, keepdims=False) for i in range(3))
  return jnp.stack([m0 + m1, m1 + m2], axis)


def winograd_2x2(z, kernel):
  """The unpadded stride-1 convolution of ``z`` by a 2x2 ``kernel`` in Winograd's F(2x2, 2x2).

  Each 2x2 output tile's 3x3 input window is turned into 9 values by sums and
  differences, the 9 are multiplied by the kernel's 9 transformed taps as 9
  ``(tiles, in) @ (in, out)`` products, and sums turn those back into the
  tile's 4 outputs: 9 products of a tile's channels where the direct
  convolution makes 16. The transforms only add and subtract, so the result
  differs from the direct one by rounding alone.
  """
  n, height, width, cin = z.shape
  cout = kernel.shape[-1]
  rows, columns = height - 1, width - 1
  tile_rows, tile_columns = -(-rows // 2), -(-columns // 2)
  blocks = _zero_pad(z, ((0, 0), (0, 2 * tile_rows + 2 - height), (0, 2 * tile_columns + 2 - width), (0, 0)))
  blocks = blocks.reshape(n, tile_rows + 1, 2, tile_columns + 1, 2, cin)
  values = _tile_values(_tile_values(blocks, 1), 3)  # (n, tile_rows, 3, tile_columns, 3, in)
  values = values.transpose(2, 4, 0, 1, 3, 5).reshape(9, -1, cin)
  taps = _kernel_values(_kernel_values(kernel, 0), 1).reshape(9, cin, cout)
  products = jnp.einsum("pti,pio->pto", values, taps, preferred_element_type=jnp.promote_types(z.dtype, jnp.float32))
  y = _output_values(_output_values(products.reshape(3, 3, n, tile_rows, tile_columns, cout), 0), 1)
  y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * tile_rows, 2 * tile_columns, cout)
  return lax.slice(y, (0, 0, 0, 0), (n, rows, columns, cout)).astype(z.dtype)


def _winograd_applies(x_shape, kernel_shape, stride: int, padding: int) -> bool:
  """Whether ``conv_winograd`` computes this convolution: 4x4 kernels, stride 1, or stride 2 on even padded sides."""
  _, height, width, _ = x_shape
  kh, kw = kernel_shape[:2]
  return (kh, kw) == (4, 4) and (stride == 1 or (stride == 2 and (height + 2 * padding) % 2 == 0
                                                  and (width + 2 * padding) % 2 == 0))


def _conv_winograd(x, kernel, stride: int, padding: int):
  cin, cout = kernel.shape[2:]
  x = _zero_pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  n, height, width, _ = x.shape
  # Kernel row a = 2q + p: (q_row, p_row, q_column, p_column, in, out).
  taps = kernel.reshape(2, 2, 2, 2, cin, cout)
  if stride == 2:  # Tap q of input phase p: a 2x2 convolution of the phases stacked as channels.
    phases = x.reshape(n, height // 2, 2, width // 2, 2, cin).transpose(0, 1, 3, 2, 4, 5)
    return winograd_2x2(phases.reshape(n, height // 2, width // 2, 4 * cin),
                        taps.transpose(0, 2, 1, 3, 4, 5).reshape(2, 2, 4 * cin, cout))
  # Stride 1: tap p of the input shifted by 2q: a 2x2 convolution of the four shifts stacked as channels.
  rows, columns = height - 2, width - 2
  shifts = [lax.slice(x, (0, 2 * q_row, 2 * q_column, 0), (n, 2 * q_row + rows, 2 * q_column + columns, cin))
            for q_row in (0, 1) for q_column in (0, 1)]
  return winograd_2x2(lax.concatenate(shifts, 3), taps.transpose(1, 3, 0, 2, 4, 5).reshape(2, 2, 4 * cin, cout))


# The most that the largest intermediate of a chunked layer (Winograd's, the strided formulations') may
# hold of a batch chunk's images. Over a whole batch of 16, Winograd's transformed inputs and products
# (and their gradients) raised a 256 px float32 step's peak memory above PyTorch's, and the strided input
# gradient's patches the bf16 step's (BENCHMARKS.md).
_CHUNK_BYTES = 48 * 2 ** 20


def _bytes_per_image(forward, x, kernel) -> int:
  """How many bytes per image the largest value ``forward(x, kernel)`` computes grows with the batch
  (traced on shapes only, at batch 1 and 2; the transformed kernel does not grow)."""
  sizes = []
  for n in (1, 2):
    jaxpr = jax.make_jaxpr(forward)(jax.ShapeDtypeStruct((n, *x.shape[1:]), x.dtype),
                                    jax.ShapeDtypeStruct(kernel.shape, kernel.dtype))
    sizes.append([v.aval.size * v.aval.dtype.itemsize for eqn in jaxpr.eqns for v in eqn.outvars])
  return max(two - one for one, two in zip(*sizes))


def _chunk_size(forward, x, kernel) -> int:
  """The largest divisor of the batch whose images' share of ``forward``'s largest intermediate fits
  ``_CHUNK_BYTES`` (one image at least). A batch of one is not traced to find out (0.2-0.3 s of
  tracing per train step at 128 px)."""
  n = x.shape[0]
  if n == 1:
    return 1
  per_image = _bytes_per_image(forward, x, kernel)
  return max(size for size in range(1, n + 1) if n % size == 0 and (size == 1 or size * per_image <= _CHUNK_BYTES))


def _by_chunks(compute, chunk: int, operands, summed: int = 0):
  """``compute(*operands) -> (*placed parts, *summed parts)``, its first parts placed along the batch and
  its last ``summed`` added up over it (a kernel's gradient), for chunks of ``chunk`` images in turn when
  that is less than the batch, in a loop: side by side, XLA would hold every chunk's intermediates at once.

  The loop's zero results, and copies of the operands before the last one that it reads, are made once
  the last operand is there: zeros made early (they depend on nothing) were copied for each loop and held
  from the step's start, through its peak; the backward pass reading ``x`` itself rather than a copy made
  after ``dy`` held 870.6 MiB float32 and 930.9 bf16 at the peak of a 256 px batch-16 step, not 854.6
  and 869.2.
  """
  n = operands[0].shape[0]
  if chunk == n:
    return compute(*operands)
  last = operands[-1]
  start = last[(0,) * last.ndim]
  operands = (*(_after(operand, start.astype(operand.dtype)) for operand in operands[:-1]), last)
  shapes = jax.eval_shape(compute, *(jax.ShapeDtypeStruct((chunk, *operand.shape[1:]), operand.dtype)
                                     for operand in operands))
  count = len(shapes) - summed
  zeros = tuple(_after(jnp.zeros((n, *shape.shape[1:]) if i < count else shape.shape, shape.dtype),
                       start.astype(shape.dtype)) for i, shape in enumerate(shapes))

  def add_chunk(i, results):
    begin = i * chunk
    parts = compute(*(lax.dynamic_slice_in_dim(operand, begin, chunk) for operand in operands))
    return (*(lax.dynamic_update_slice_in_dim(result, part, begin, 0) for result, part in zip(results[:count], parts)),
            *(result + part for result, part in zip(results[count:], parts[count:])))
  return lax.fori_loop(0, n // chunk, add_chunk, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _in_chunks(forward, gradients, chunk: int, x, kernel):
  """``forward(x, kernel)`` for chunks of ``chunk`` images in turn, keeping only ``x`` and ``kernel`` for
  the backward pass, where ``gradients(x, kernel, dy) -> (dx, dkernel)`` runs chunk by chunk too."""
  return _by_chunks(lambda part: (forward(part, kernel),), chunk, (x,))[0]


def _in_chunks_fwd(forward, gradients, chunk, x, kernel):
  return _in_chunks(forward, gradients, chunk, x, kernel), (x, kernel)


def _in_chunks_bwd(forward, gradients, chunk, residuals, dy):
  x, kernel = residuals
  return _by_chunks(lambda x, dy: gradients(x, kernel, dy), chunk, (x, dy), summed=1)


_in_chunks.defvjp(_in_chunks_fwd, _in_chunks_bwd)


def _recomputed_gradients(forward, x, kernel, dy):
  """``forward``'s gradients, its intermediates computed again from operands made to depend on ``dy``:
  from ``x`` and ``kernel`` themselves (``jax.checkpoint``'s way) XLA found them equal to the forward
  pass's and kept those (at 256 px batch 4 the transformed inputs and kernels were live at the step's
  peak)."""
  corner = dy[(0,) * dy.ndim]
  return jax.vjp(forward, *(_after(r, corner.astype(r.dtype)) for r in (x, kernel)))[1](dy)


def _recomputing_in_chunks(forward, x, kernel):
  """``forward(x, kernel)`` keeping only its operands, its batch in chunks of ``_chunk_size``."""
  return _in_chunks(forward, functools.partial(_recomputed_gradients, forward), _chunk_size(forward, x, kernel),
                    x, kernel)


def conv_winograd(x, kernel, stride: int, padding: int):
  """A 4x4 convolution (stride 1, or 2 on even padded sides) in Winograd's F(2x2, 2x2): 9/16 of the products' work.

  A 4x4 kernel is four 2x2 ones, each tap ``p`` of quarter ``q`` reading the
  input at ``stride * i + 2q + p``. Stride 2: the padded input's 2x2 phases
  side by side as channels make it a 2x2 convolution. Stride 1: so do the
  input's four shifts by ``2q``. Forward and both gradients run 9 products
  per 2x2 output tile (autodiff of the transforms); the transformed input,
  2.25 times the stacked input, is computed again for the backward pass
  rather than kept, and a batch is computed in chunks
  (``_recomputing_in_chunks``), so the layer keeps what XLA's own convolution
  keeps and its intermediates do not grow with the batch. Float32: in bf16 on
  XLA:CPU the 9 products ran slower than the matmul formulations
  (BENCHMARKS.md).
  """
  return _recomputing_in_chunks(functools.partial(_conv_winograd, stride=stride, padding=padding), x, kernel)


CONV_IMPLS = ("auto", "xla", "matmul")
# What "auto" picks on each backend when nothing was measured (tuning.py), from
# the measurements in BENCHMARKS.md; a backend not listed keeps XLA's own convolution.
_AUTO_CONV = {"cpu": ((32, "matmul"),)}
# The same for convolutions that conv_matmul computes on its output side (few output
# channels, as the PatchGAN's last layer): there XLA:CPU's own convolution, its kernel
# gradient above all, is 8-40x slower than the matmul at every side (BENCHMARKS.md), and
# at 512 px, batch 1, the layer is under tuning.MIN_FLOPS, so nothing measures it.
_AUTO_CONV_OUTPUT_SIDE = {"cpu": ((math.inf, "matmul"),)}


def resolve_conv_impl(impl: str, side: int, output_side: bool = False) -> str:
  """The formulation that runs for an explicit ``impl``, or the static default of "auto" for a
  convolution whose input side is ``side`` (and that ``conv_matmul`` computes on its output side
  when ``output_side``)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"config.model.conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
  if impl == "auto":
    return _pick(_AUTO_CONV_OUTPUT_SIDE if output_side else _AUTO_CONV, "xla", side)
  return impl


def conv_site(x, kernel_shape, stride: int, padding: int, dtype) -> tuning.Site:
  """The formulations of a convolution of ``x`` for "auto": XLA's, matmul, and where they apply
  ``strided_conv`` and ``strided_conv_matmul``, or ``conv_taps``, and ``conv_winograd``.

  ``conv_taps`` competes where matmul would build a patch matrix for a
  stride-1 convolution (not where it multiplies on the output side, as for the
  PatchGAN's 1-channel last layer, where one output column per tap product
  cannot win), and is the default there when the static table says matmul:
  without the patches, for about 4% of the step at 256 px batch 16 on Zen 4
  (BENCHMARKS.md). ``conv_winograd`` competes for 4x4 kernels in float32
  where matmul would not multiply on the output side.
  """
  formulations = {"xla": functools.partial(conv_xla, stride=stride, padding=padding),
                  "matmul": functools.partial(conv_matmul, stride=stride, padding=padding)}
  strided = _input_gradient_as_matmul(x.shape, kernel_shape[0], stride, padding)
  if strided:
    formulations.update(strided=strided_conv, strided_matmul=strided_conv_matmul)
  padded = (x.shape[0], x.shape[1] + 2 * padding, x.shape[2] + 2 * padding, x.shape[3])
  output_side = _on_output_side(padded, kernel_shape, stride)
  if stride == 1 and not output_side:
    formulations["taps"] = functools.partial(conv_taps, padding=padding)
  if _winograd_applies(x.shape, kernel_shape, stride, padding) and not output_side and not _bf16_on_cpu(dtype):
    formulations["winograd"] = functools.partial(conv_winograd, stride=stride, padding=padding)
  default = resolve_conv_impl("auto", x.shape[1], output_side)
  if default == "matmul" and "taps" in formulations:
    default = "taps"
  if default == "xla" and strided:
    default = "strided"
  return tuning.site("conv", x, kernel_shape, stride, padding, dtype, formulations, default)


class Conv(nn.Module):
  """A PyTorch-style Conv2d (symmetric zero padding) with the reference init.

  Parameters are named as ``nn.Conv``'s; ``impl`` chooses the formulation:
  "xla" is XLA's own convolution, forward and backward, "matmul" one matmul;
  "auto" runs what ``tuning`` measured fastest for this shape on this
  machine (``conv_site``), else the static table's choice (``strided_conv`` for
  a 4x4/stride-2 one where the matmul transposed convolution is the faster
  input gradient, ``conv_taps`` for a stride-1 one that matmul would run
  through a patch matrix, matmul at any side where it multiplies on the
  output side).
  """
  features: int
  kernel_size: int
  stride: int
  padding: int
  use_bias: bool
  impl: str = "auto"
  dtype: Optional[jnp.dtype] = None

  def tuning_site(self, x) -> Optional[tuning.Site]:
    """What ``tuning`` measures for this layer applied to ``x``; None when ``impl`` is not "auto"."""
    if self.impl != "auto":
      return None
    kernel_shape = (self.kernel_size, self.kernel_size, x.shape[-1], self.features)
    return conv_site(x, kernel_shape, self.stride, self.padding, self.dtype or x.dtype)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (self.kernel_size, self.kernel_size, x.shape[-1], self.features))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    if self.impl == "auto":
      site = self.tuning_site(x)
      y = site.formulations[tuning.choice(site)](x, kernel)
    elif resolve_conv_impl(self.impl, x.shape[1]) == "matmul":
      y = conv_matmul(x, kernel, self.stride, self.padding)
    else:
      y = conv_xla(x, kernel, self.stride, self.padding)
    return _hand_on(self, y, dtype)


def conv_transpose(x, kernel, stride: int, padding: int, output_padding: int = 0):
  """PyTorch's ``ConvTranspose2d`` as one dilated convolution (XLA's own lowering).

  ``kernel`` is ``(in, kh, kw, out)``: each input pixel scatters ``kernel``
  into the output at ``stride * i + k - padding``.
  """
  x, kernel = _xla_conv_operands(x, kernel)
  k = kernel.shape[1]
  lo, hi = k - 1 - padding, k - 1 - padding + output_padding
  hwio = jnp.flip(kernel.transpose(1, 2, 0, 3), (0, 1))
  return lax.conv_general_dilated(
      x, hwio, window_strides=(1, 1), padding=((lo, hi), (lo, hi)),
      lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def overlap_add(patches):
  """Sums every input pixel's 4x4 output patch into the stride-2, padding-1 output.

  ``patches`` is ``(n, h, w, 4, 4, c)``; tap ``(a, b)`` of input pixel ``(i, j)``
  lands on output ``(2i + a - 1, 2j + b - 1)``. Writing ``a = 2q + p``, each
  output phase ``p`` sums two taps shifted by ``q``. The gradient is the
  matching gather, written out: XLA's transpose of these pads and sums runs an
  order of magnitude slower on CPU (BENCHMARKS.md). Being a ``custom_vjp``, it
  supports reverse-mode differentiation only, which is what training uses.
  """
  n, h, w, _, _, c = patches.shape
  flat = patches.reshape(n, h, w, 16 * c)
  tap = lambda a, b: lax.slice_in_dim(flat, (4 * a + b) * c, (4 * a + b + 1) * c, axis=3)
  phases = [[functools.reduce(operator.add, (
      _zero_pad(tap(2 * q_row + p_row, 2 * q_col + p_col), ((0, 0), (q_row, 1 - q_row), (q_col, 1 - q_col), (0, 0)))
      for q_row in (0, 1) for q_col in (0, 1)))
             for p_col in (0, 1)] for p_row in (0, 1)]
  # Interleave the phases: (n, h+1, p_row, w+1, p_col, c), then crop the padding of 1.
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2).reshape(n, 2 * h + 2, 2 * w + 2, c)
  return lax.slice(y, (0, 1, 1, 0), (n, 2 * h + 1, 2 * w + 1, c))


def _overlap_add_transpose(dy):
  """Each tap's cotangent: the output pixel it landed on, which is the stride-2 im2col of ``dy``."""
  n, height, width, c = dy.shape
  h, w = height // 2, width // 2
  padded = _zero_pad(dy, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return _phase_patches(padded, kernel_shape=(4, 4), stride=2, output_shape=(h, w)).reshape(n, h, w, 4, 4, c)


overlap_add.defvjp(lambda patches: (overlap_add(patches), None),
                   lambda _, dy: (_overlap_add_transpose(dy),))


def conv_transpose_matmul(x, kernel):
  """The 4x4/stride-2/padding-1 transposed convolution as one matmul plus overlap-add.

  One ``(pixels, in) @ (in, 16 * out)`` matmul gives every pixel's 4x4 patch.
  Both gradients are matmuls too, which XLA:CPU runs many times faster than
  the gradients of the dilated convolution (BENCHMARKS.md).
  """
  n, h, w, cin = x.shape
  cout = kernel.shape[-1]
  patches = matmul(x.reshape(-1, cin), kernel.reshape(cin, 16 * cout))
  return overlap_add(patches.reshape(n, h, w, 4, 4, cout))


def _conv_transpose_winograd(x, kernel):
  n, height, width, cin = x.shape
  cout = kernel.shape[-1]
  # Output row 2m + r sums input rows m - 1 and m times kernel rows 3 and 1 (r = 0), rows m and
  # m + 1 times kernel rows 2 and 0 (r = 1): the flipped kernel's row 2a + r times padded row m + r + a.
  taps = jnp.flip(kernel, (1, 2)).reshape(cin, 2, 2, 2, 2, cout)  # (in, a_row, r_row, a_column, r_column, out)
  taps = taps.transpose(1, 3, 0, 2, 4, 5).reshape(2, 2, cin, 4 * cout)
  padded = _zero_pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifted = winograd_2x2(padded, taps).reshape(n, height + 1, width + 1, 2, 2, cout)
  phase = lambda r_row, r_column: lax.slice(
      shifted, (0, r_row, r_column, r_row, r_column, 0),
      (n, r_row + height, r_column + width, r_row + 1, r_column + 1, cout)).reshape(n, height, width, cout)
  phases = [[phase(r_row, r_column) for r_column in (0, 1)] for r_row in (0, 1)]
  y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # (n, height, r_row, width, r_column, out)
  return y.reshape(n, 2 * height, 2 * width, cout)


def conv_transpose_winograd(x, kernel):
  """The 4x4/stride-2/padding-1 transposed convolution in Winograd's F(2x2, 2x2).

  Each of the output's four phases is a 2x2 convolution of the input padded by
  one, with its quarter of the (flipped) kernel, so one 2x2 convolution with
  four times the outputs gives all four: 9 products per 2x2 input tile where
  ``conv_transpose_matmul`` makes 16. As ``conv_winograd``, the transformed
  input is computed again for the backward pass, not kept, and a batch is
  computed in chunks.
  """
  return _recomputing_in_chunks(_conv_transpose_winograd, x, kernel)


def _conv_4x4_s2_xla(x, kernel):
  return conv_xla(x, kernel, 2, 1)


def _conv_4x4_s2_matmul(x, kernel):
  return conv_matmul(x, kernel, 2, 1)


def _strided_input_gradient(dy, kernel):
  """The input gradient of a 4x4/stride-2/padding-1 convolution: the matmul transposed convolution."""
  return conv_transpose_matmul(dy.astype(kernel.dtype), kernel.transpose(3, 0, 1, 2))


def _strided_gradients(forward, dx_chunk: int, x, kernel, dy):
  """The input gradient as the matmul transposed convolution, for chunks of ``dx_chunk`` images in turn;
  the kernel's as ``forward``'s."""
  dx, = _by_chunks(lambda dy: (_strided_input_gradient(dy, kernel).astype(x.dtype),), dx_chunk, (dy,))
  # The kernel's gradient from the input after dx: else XLA finds the im2col patches that a matmul
  # ``forward``'s gradient builds equal to the forward pass's, and keeps those from the forward pass
  # on, four times the input (at 256 px batch 16, 200 MiB more at the bf16 step's peak). Kept for
  # XLA's own convolution too, which builds no patches: the order alone saved 140 MiB there.
  after_dx = _after(x, dx[0, 0, 0, 0])
  _, kernel_vjp = jax.vjp(lambda k: forward(after_dx, k), kernel)
  return dx, kernel_vjp(dy)[0]


def _strided(forward, x, kernel, forward_in_chunks: bool):
  """A 4x4/stride-2/padding-1 convolution computed by ``forward``, which also gives the kernel's
  gradient, and whose input gradient is the matmul transposed convolution; in chunks whose largest
  intermediate, the forward pass's patches or the input gradient's (float32, 16 times the input's
  channels per output pixel: 256 MiB for the PatchGAN's ``conv_1`` at 256 px batch 16, the bf16
  step's peak), fits ``_CHUNK_BYTES``. The forward pass and the kernel's gradient go in chunks only
  when ``forward_in_chunks``: XLA:CPU ran its own convolution 10-17 times slower in a loop."""
  chunk = _chunk_size(lambda x, kernel: _strided_input_gradient(forward(x, kernel), kernel), x, kernel)
  gradients = functools.partial(_strided_gradients, forward, chunk)
  return _in_chunks(forward, gradients, chunk if forward_in_chunks else x.shape[0], x, kernel)


def strided_conv(x, kernel):
  """XLA's 4x4/stride-2/padding-1 convolution, its input gradient a matmul transposed convolution.

  That gradient is the transposed convolution of the same kernel, which
  XLA:CPU runs as an input-dilated convolution: at 256 px, batch 4, the four of
  them at 128 px took 0.55 s of a 1.9 s step on Zen 5; ``conv_transpose_matmul``
  makes the step 22% faster there and 11% at batch 1 (BENCHMARKS.md). The
  kernel's gradient stays XLA's. Input sides must be even.
  """
  return _strided(_conv_4x4_s2_xla, x, kernel, forward_in_chunks=False)


def strided_conv_matmul(x, kernel):
  """``strided_conv`` with all three products as matmuls, keeping only its input for the backward pass.

  The forward pass and the kernel's gradient each build the im2col patches
  and drop them (``conv_matmul`` keeps them, four times its input), so it
  holds what ``strided_conv`` holds; for bf16 on CPU every product then runs
  on the bf16 units, where XLA's own convolutions run in float32.
  """
  return _strided(_conv_4x4_s2_matmul, x, kernel, forward_in_chunks=True)


def _input_gradient_as_matmul(shape, kernel_size: int, stride: int, padding: int) -> bool:
  """Whether "auto" runs a convolution as ``strided_conv``: when "auto" takes the transposed
  convolution of its output's side as a matmul, and the input's sides are even."""
  _, height, width, _ = shape
  return ((kernel_size, stride, padding) == (4, 2, 1) and height % 2 == 0 and width % 2 == 0
          and resolve_upconv_impl("auto", 4, 2, 1, 0, height // 2) == "matmul")


UPCONV_IMPLS = ("auto", "conv_transpose", "matmul")
# What "auto" picks on each backend: the first (largest input side, impl) that
# fits, from the measurements in BENCHMARKS.md. A backend not listed keeps XLA's
# own transposed convolution.
_AUTO_UPCONV = {"cpu": ((math.inf, "matmul"),)}


def resolve_upconv_impl(impl: str, kernel_size: int, stride: int, padding: int, output_padding: int,
                        side: int) -> str:
  """The formulation that runs for an explicit ``impl``, or the static default of "auto".

  Shapes other than the U-Net's 4x4/stride-2/padding-1 use the plain one.
  """
  if impl not in UPCONV_IMPLS:
    raise ValueError(f"config.model.upconv_impl must be one of {UPCONV_IMPLS}, got {impl!r}")
  if (kernel_size, stride, padding, output_padding) != (4, 2, 1, 0):
    return "conv_transpose"
  if impl == "auto":
    return _pick(_AUTO_UPCONV, "conv_transpose", side)
  return impl


class ConvTranspose(nn.Module):
  """A PyTorch-style ``ConvTranspose2d`` with the reference init.

  ``impl`` chooses the formulation (the parameters are the same for all);
  "auto" runs what ``tuning`` measured fastest here for the 4x4/stride-2/padding-1
  shape, else the static table's choice.
  """
  features: int
  kernel_size: int = 4
  stride: int = 2
  padding: int = 1
  output_padding: int = 0
  use_bias: bool = False
  impl: str = "auto"
  dtype: Optional[jnp.dtype] = None

  def tuning_site(self, x) -> Optional[tuning.Site]:
    """What ``tuning`` measures for this layer applied to ``x``; None when there is nothing to choose."""
    shape = (self.kernel_size, self.stride, self.padding, self.output_padding)
    if self.impl != "auto" or shape != (4, 2, 1, 0):
      return None
    formulations = {"matmul": conv_transpose_matmul,
                    "conv_transpose": functools.partial(conv_transpose, stride=2, padding=1)}
    if not _bf16_on_cpu(self.dtype or x.dtype):
      formulations["winograd"] = conv_transpose_winograd
    return tuning.site("upconv", x, (x.shape[-1], 4, 4, self.features), 2, 1, self.dtype or x.dtype,
                       formulations, resolve_upconv_impl("auto", *shape, x.shape[1]))

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", conv_init, (x.shape[-1], self.kernel_size, self.kernel_size, self.features))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    impl = resolve_upconv_impl(self.impl, self.kernel_size, self.stride, self.padding, self.output_padding,
                               x.shape[1])
    site = self.tuning_site(x)
    if site is not None:
      y = site.formulations[tuning.choice(site)](x, kernel)
    elif impl == "matmul":
      y = conv_transpose_matmul(x, kernel)
    else:
      y = conv_transpose(x, kernel, self.stride, self.padding, self.output_padding)
    return _hand_on(self, y, dtype)


def reflect_pad(x, pad: int):
  return jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
