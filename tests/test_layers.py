"""Every alternative formulation equals the plain one: outputs and both gradients."""

import functools
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from p2p_jax import layers, train, tuning
from tests.conftest import tiny_pix2pix


@functools.partial(jax.jit, static_argnums=0)  # One compilation, not one per op.
def _values_and_grads(f, x, kernel):
  # A random cotangent, so that every output element's gradient path is checked.
  cotangent = jax.random.normal(jax.random.key(7), jax.eval_shape(f, x, kernel).shape)
  y, vjp = jax.vjp(f, x, kernel)
  return (y, *vjp(cotangent))


def _assert_same(f, g, x, kernel):
  """Agreement to 1e-5 of each tensor's scale (gradients sum many float32 products)."""
  for a, b in zip(_values_and_grads(f, x, kernel), _values_and_grads(g, x, kernel)):
    assert a.shape == b.shape
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(b))))


def _inputs(size, cin, cout, k=4, batch=2, transposed=False):
  """An input and a kernel: HWIO, or ``(in, kh, kw, out)`` for a transposed conv."""
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  shape = (cin, k, k, cout) if transposed else (k, k, cin, cout)
  kernel = 0.1 * jax.random.normal(jax.random.key(1), shape)
  return x, kernel


@pytest.mark.parametrize("size,cin,cout", [(1, 8, 4), (2, 16, 8), (8, 6, 5), (16, 4, 3)])
def test_matmul_transposed_conv_equals_the_dilated_one(size, cin, cout):
  x, kernel = _inputs(size, cin, cout, transposed=True)
  _assert_same(lambda x, k: layers.conv_transpose(x, k, 2, 1), layers.conv_transpose_matmul, x, kernel)


def test_plain_transposed_conv_is_pytorchs_scatter():
  """out[2i + a - 1] += x[i] * k[a]: the definition of ConvTranspose2d(4, 2, 1)."""
  x, kernel = _inputs(3, 2, 2, batch=1, transposed=True)
  expected = np.zeros((1, 8, 8, 2), np.float32)
  for i in range(3):
    for j in range(3):
      expected[0, 2 * i:2 * i + 4, 2 * j:2 * j + 4] += np.einsum("c,cabo->abo", x[0, i, j], kernel)
  np.testing.assert_allclose(layers.conv_transpose(x, kernel, 2, 1), expected[:, 1:-1, 1:-1], atol=1e-5)


# U-Net and PatchGAN 4x4 (stride 2 and 1), the ResNet's 3x3/s2/p1, 3x3 and 7x7 stride 1; the
# last three have few output channels and take the output-side formulation.
@pytest.mark.parametrize("size,cin,cout,k,stride,padding", [
    (8, 3, 4, 4, 2, 1), (2, 8, 8, 4, 2, 1), (9, 3, 4, 3, 2, 1), (6, 4, 4, 3, 1, 0), (10, 3, 2, 7, 1, 0),
    (9, 5, 1, 4, 1, 1), (9, 16, 1, 4, 2, 1), (8, 8, 2, 3, 1, 1), (9, 8, 16, 4, 2, 1), (7, 6, 16, 3, 1, 1)])
def test_matmul_conv_equals_the_native_one(size, cin, cout, k, stride, padding):
  x, kernel = _inputs(size, cin, cout, k=k)
  native = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  _assert_same(native, lambda x, w: layers.conv_matmul(x, w, stride, padding), x, kernel)


@pytest.mark.parametrize("impl", ["conv_transpose", "matmul", "auto"])
def test_modules_give_the_same_output_and_parameters_whatever_the_impl(impl):
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
  reference = layers.ConvTranspose(5, use_bias=True, impl="conv_transpose")
  variables = reference.init(jax.random.key(1), x)
  module = layers.ConvTranspose(5, use_bias=True, impl=impl)
  assert jax.tree_util.tree_structure(module.init(jax.random.key(1), x)) == jax.tree_util.tree_structure(variables)
  np.testing.assert_allclose(module.apply(variables, x), reference.apply(variables, x), atol=1e-5)
  conv = lambda impl: layers.Conv(4, 4, 2, 1, use_bias=False, impl=impl)
  conv_vars = conv("xla").init(jax.random.key(2), x)
  conv_impl = {"conv_transpose": "xla"}.get(impl, impl)
  np.testing.assert_allclose(conv(conv_impl).apply(conv_vars, x), conv("xla").apply(conv_vars, x), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 64, 64, 5), (1, 64, 48, 3)])
def test_auto_strided_conv_takes_its_input_gradient_from_the_matmul_transposed_conv(shape):
  """Same values and gradients as XLA's convolution, and no input-dilated convolution left."""
  x = jax.random.normal(jax.random.key(0), shape)
  conv = lambda impl: layers.Conv(7, 4, 2, 1, use_bias=True, impl=impl)
  variables = conv("xla").init(jax.random.key(1), x)
  loss = lambda impl: lambda v, x: jnp.sum(jnp.sin(conv(impl).apply(v, x)))
  grads = {impl: jax.grad(loss(impl), (0, 1))(variables, x) for impl in ("auto", "xla")}
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-4, rtol=1e-4), grads["auto"], grads["xla"])
  np.testing.assert_allclose(conv("auto").apply(variables, x), conv("xla").apply(variables, x), atol=1e-5)
  backward = lambda impl: jax.jit(jax.grad(loss(impl), 1)).lower(variables, x).as_text()
  assert "lhs_dilate = [2, 2]" in backward("xla") and "lhs_dilate = [2, 2]" not in backward("auto")


@pytest.mark.parametrize("size,cin,cout,batch", [(8, 3, 5, 2), (16, 16, 4, 1)])
def test_strided_matmul_conv_equals_xlas_with_both_gradients(size, cin, cout, batch):
  x, kernel = _inputs(size, cin, cout, batch=batch)
  _assert_same(layers.strided_conv_matmul, functools.partial(layers.conv_xla, stride=2, padding=1), x, kernel)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_strided_matmul_conv_holds_only_its_input_until_its_backward_pass(dtype):
  """Its kernel's gradient builds im2col patches again; XLA found them equal to the forward pass's
  and kept those through everything after the layer: at 256 px, batch 16, two layers' patches
  (128 MiB each in bf16) were at the step's memory peak. After it here, six dense layers."""
  n_dense = 6
  x = jax.random.normal(jax.random.key(0), (8, 64, 64, 32)).astype(dtype)
  kernel = 0.02 * jax.random.normal(jax.random.key(1), (4, 4, 32, 128)).astype(dtype)
  weights = [jax.random.normal(jax.random.key(2 + i), (128, 128)) / 12 for i in range(n_dense)]

  def loss(params, x):
    kernel, weights = params
    h = layers.strided_conv_matmul(x, kernel).astype(jnp.float32)
    for w in weights:
      h = jnp.tanh(h @ w)
    return jnp.sum(jnp.square(h))

  compiled = jax.jit(jax.grad(loss)).lower((kernel, weights), x).compile()
  held = jax.ShapeDtypeStruct((8, 32, 32, 128), jnp.float32)  # Each dense layer's input.
  # The dense layers' inputs and three at work: the patches (4 of these in float32, 2 in bf16)
  # held as well made it 13 and 11.
  assert compiled.memory_analysis().temp_size_in_bytes <= (n_dense + 3) * held.size * 4 + 2**16


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stride_2_patches_are_written_once(dtype):
  """A concatenation of the 16 strided windows had every window written before the patches: twice
  the patch matrix at a time (at 256 px batch 16 bf16, the PatchGAN's conv_1 windows, 128 MiB, were
  at the step's memory peak)."""
  x = jax.ShapeDtypeStruct((2, 32, 32, 16), dtype)
  kernel = jax.ShapeDtypeStruct((4, 4, 16, 32), dtype)
  compiled = jax.jit(functools.partial(layers.conv_matmul, stride=2, padding=1)).lower(x, kernel).compile()
  patches, padded = 2 * 16 * 16 * (16 * 16), 2 * 34 * 34 * 16
  held = jnp.dtype(dtype).itemsize * (patches + padded)
  assert compiled.memory_analysis().temp_size_in_bytes <= held + 2**12


# The PatchGAN's 4x4/p1 layer, a ResNet block's 3x3/p0 one, a 1x1, one with few output channels.
@pytest.mark.parametrize("size,cin,cout,k,padding", [(9, 5, 3, 4, 1), (6, 4, 4, 3, 0), (5, 3, 6, 1, 0), (8, 8, 1, 4, 1)])
def test_tap_conv_equals_xlas_with_both_gradients(size, cin, cout, k, padding):
  x, kernel = _inputs(size, cin, cout, k=k)
  _assert_same(functools.partial(layers.conv_taps, padding=padding),
               functools.partial(layers.conv_xla, stride=1, padding=padding), x, kernel)


# (height, width, in, out, stride, padding): the U-Net's and PatchGAN's 4x4 layers, odd and uneven sides.
@pytest.mark.parametrize("height,width,cin,cout,stride,padding", [
    (8, 8, 3, 4, 2, 1), (16, 10, 5, 7, 2, 1), (6, 6, 3, 2, 2, 1), (10, 12, 3, 4, 2, 0), (2, 2, 8, 3, 2, 1),
    (9, 9, 5, 3, 1, 1), (8, 11, 4, 6, 1, 1), (7, 7, 2, 3, 1, 0), (5, 6, 3, 3, 1, 2)])
def test_winograd_conv_equals_xlas_with_both_gradients(height, width, cin, cout, stride, padding):
  x = jax.random.normal(jax.random.key(0), (2, height, width, cin))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (4, 4, cin, cout))
  assert layers._winograd_applies(x.shape, kernel.shape, stride, padding)
  _assert_same(functools.partial(layers.conv_winograd, stride=stride, padding=padding),
               functools.partial(layers.conv_xla, stride=stride, padding=padding), x, kernel)


@pytest.mark.parametrize("height,width", [(1, 1), (2, 3), (5, 5), (8, 6)])
def test_winograd_transposed_conv_equals_the_dilated_one(height, width):
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), (3, 4, 4, 5))
  _assert_same(layers.conv_transpose_winograd, lambda x, k: layers.conv_transpose(x, k, 2, 1), x, kernel)


def _product_flops(f, *args):
  """FLOPs of the dot products in ``f``'s jaxpr (which must hold no convolution)."""
  equations = list(_equations(jax.make_jaxpr(f)(*args).jaxpr))
  assert not [e for e in equations if e.primitive.name == "conv_general_dilated"]
  dots = [e for e in equations if e.primitive.name == "dot_general"]
  return sum(2 * np.prod(e.outvars[0].aval.shape) * np.prod(
      [e.invars[0].aval.shape[d] for d in e.params["dimension_numbers"][0][0]]) for e in dots)


@pytest.mark.parametrize("stride,side", [(2, 16), (1, 11)])
def test_winograd_makes_9_products_where_the_direct_convolution_makes_16(stride, side):
  """Where 2x2 tiles divide the output (8x8 and 10x10 here) the products' work is 9/16 of the direct one's."""
  x, kernel = jnp.ones((1, side, side, 8)), jnp.ones((4, 4, 8, 4))
  outputs = (side + 2 - 4) // stride + 1
  direct = 2 * outputs ** 2 * 16 * 8 * 4
  flops = _product_flops(functools.partial(layers.conv_winograd, stride=stride, padding=1), x, kernel)
  assert 16 * flops == 9 * direct
  up = _product_flops(layers.conv_transpose_winograd, jnp.ones((1, 4, 4, 8)), jnp.ones((8, 4, 4, 4)))
  assert up == 2 * 9 * (6 // 2) ** 2 * 8 * 16  # The input padded to 6x6: 5x5 outputs per phase, 3x3 tiles.


def test_winograd_keeps_only_its_input_and_kernel_until_the_backward_pass():
  """The transformed input is 2.25 times the input; kept, it would live from the forward to the backward pass."""
  x = jax.ShapeDtypeStruct((2, 16, 16, 8), jnp.float32)
  input_and_kernel = (x.size + 4 * 4 * 8 * 16) * 4
  for stride in (1, 2):
    site = layers.conv_site(x, (4, 4, 8, 16), stride, 1, jnp.float32)
    assert tuning.kept_bytes(site.formulations["winograd"], site) == input_and_kernel
  up = layers.ConvTranspose(16).tuning_site(jnp.zeros(x.shape))
  assert tuning.kept_bytes(up.formulations["winograd"], up) == input_and_kernel


@pytest.mark.parametrize("chunk_images", [None, 2])
@pytest.mark.parametrize("stride", [1, 2, "transposed"])
def test_winograd_holds_no_more_than_xlas_convolution_until_its_backward_pass(stride, chunk_images, monkeypatch):
  """Its transformed input (2.25 times its stacked input) is computed again in the backward pass: from the
  input itself (``jax.checkpoint``) XLA found it equal to the forward pass's and kept that through the
  six dense layers after it (1.3, 8.4 and 2.8 MB more than XLA's convolution here; at 256 px batch 4
  the step's temporary buffers were 741 MiB against 421). So in chunks of 2 images."""
  if chunk_images:
    monkeypatch.setattr(layers, "_chunk_size", lambda forward, x, kernel: min(chunk_images, x.shape[0]))
  if stride == "transposed":
    x, kernel = jax.random.normal(jax.random.key(0), (8, 16, 16, 128)), jnp.full((128, 4, 4, 32), 0.01)
    winograd, xla = layers.conv_transpose_winograd, functools.partial(layers.conv_transpose, stride=2, padding=1)
  else:
    x, kernel = jax.random.normal(jax.random.key(0), (8, 32, 32, 32)), jnp.full((4, 4, 32, 32), 0.01)
    winograd = functools.partial(layers.conv_winograd, stride=stride, padding=1)
    xla = functools.partial(layers.conv_xla, stride=stride, padding=1)
  weights = [jax.random.normal(jax.random.key(2), (32, 256)) / 6]
  weights += [jax.random.normal(jax.random.key(3 + i), (256, 256)) / 16 for i in range(6)]

  def temporary_bytes(conv):
    def loss(params, x):
      kernel, weights = params
      h = conv(x, kernel)
      for w in weights:
        h = jnp.tanh(h @ w)
      return jnp.sum(jnp.square(h))
    return jax.jit(jax.grad(loss)).lower((kernel, weights), x).compile().memory_analysis().temp_size_in_bytes

  assert temporary_bytes(winograd) <= temporary_bytes(xla)


# The formulations that run a large batch in chunks, as (conv(x, kernel), XLA's, kernel shape (in, out)).
_CHUNKED = {
    "winograd s1": (functools.partial(layers.conv_winograd, stride=1, padding=1),
                    functools.partial(layers.conv_xla, stride=1, padding=1), lambda cin, cout: (4, 4, cin, cout)),
    "winograd s2": (functools.partial(layers.conv_winograd, stride=2, padding=1),
                    functools.partial(layers.conv_xla, stride=2, padding=1), lambda cin, cout: (4, 4, cin, cout)),
    "winograd transposed": (layers.conv_transpose_winograd, lambda x, k: layers.conv_transpose(x, k, 2, 1),
                            lambda cin, cout: (cin, 4, 4, cout)),
    "strided": (layers.strided_conv, functools.partial(layers.conv_xla, stride=2, padding=1),
                lambda cin, cout: (4, 4, cin, cout)),
    "strided_matmul": (layers.strided_conv_matmul, functools.partial(layers.conv_xla, stride=2, padding=1),
                       lambda cin, cout: (4, 4, cin, cout)),
}


@pytest.mark.parametrize("name", sorted(_CHUNKED))
def test_chunked_formulations_equal_xlas_with_both_gradients(name, monkeypatch):
  """A batch of 6 in chunks of 2 images: each chunk's outputs and input gradients land in their place, and
  the kernel's gradient sums all chunks'."""
  conv, xla, kernel_shape = _CHUNKED[name]
  x = jax.random.normal(jax.random.key(0), (6, 8, 8, 5))
  kernel = 0.1 * jax.random.normal(jax.random.key(1), kernel_shape(5, 3))
  monkeypatch.setattr(layers, "_CHUNK_BYTES", 0)  # One image per chunk ...
  assert layers._chunk_size(lambda x, kernel: conv(x, kernel), x, kernel) == 1
  monkeypatch.setattr(layers, "_chunk_size", lambda forward, x, kernel: min(2, x.shape[0]))  # ... or two.
  _assert_same(conv, xla, x, kernel)


def test_winograd_chunks_hold_what_their_largest_intermediate_allows():
  """The transformed input of a stride-1 layer is 9 times its input (four shifts, 9 values per 2x2 tile),
  its transformed kernel the same at any batch; a chunk takes the images whose share fits, dividing the batch."""
  forward = functools.partial(layers._conv_winograd, stride=1, padding=1)
  x, kernel = jnp.zeros((12, 14, 14, 8)), jnp.zeros((4, 4, 8, 16))  # 7x7 tiles of 32 channels per image.
  per_image = 9 * 49 * 32 * 4
  assert layers._bytes_per_image(forward, x, kernel) == per_image
  for fits, chunk in ((12, 12), (11, 6), (5, 4), (3, 3), (2, 2), (0, 1)):
    with mock.patch.object(layers, "_CHUNK_BYTES", fits * per_image):
      assert layers._chunk_size(forward, x, kernel) == chunk


@pytest.mark.parametrize("name", sorted(_CHUNKED))
def test_chunked_temporaries_grow_with_the_batch_only_as_their_input_and_output(name, monkeypatch):
  """Over a whole batch a Winograd layer's transformed inputs, products and their gradients grow with it (at
  256 px batch 16 they set the float32 step's peak above PyTorch's), and so do a strided convolution's
  patches (its input gradient's, float32, set the bf16 step's); in chunks of 2 images, each image more
  adds no more than twice its input and output (the gradients' copies of them), not those."""
  # Not raising where there are no chunks, so that the test measures what a whole batch needs there.
  monkeypatch.setattr(layers, "_chunk_size", lambda forward, x, kernel: min(2, x.shape[0]), raising=False)
  conv, _, kernel_shape = _CHUNKED[name]
  cin = 64 if name == "winograd transposed" else 32
  kernel = jnp.full(kernel_shape(cin, 96 - cin), 0.01)

  def temporary_bytes(batch):
    x = jax.ShapeDtypeStruct((batch, 32, 32, cin), jnp.float32)
    forward_and_gradients = lambda x, kernel: jax.vjp(conv, x, kernel)[1](conv(x, kernel))
    return jax.jit(forward_and_gradients).lower(x, kernel).compile().memory_analysis().temp_size_in_bytes

  image = jax.ShapeDtypeStruct((1, 32, 32, cin), jnp.float32)
  input_and_output = 4 * (image.size + jax.eval_shape(conv, image, kernel).size)
  assert temporary_bytes(8) - temporary_bytes(2) <= 6 * 2 * input_and_output


def test_a_step_running_winograd_in_chunks_holds_about_what_the_static_table_does(monkeypatch):
  """The chunk loops' zero results are made once the loop's operands are there: made at the start (they
  depend on nothing), XLA copied them for each loop and held them through the forward pass (here 21.6 MB
  of temporaries against 12.1; at 256 px batch 16, 384 MiB at the step's peak)."""
  monkeypatch.setattr(layers, "_chunk_size", lambda forward, x, kernel: min(2, x.shape[0]))
  pix2pix = tiny_pix2pix(ngf=16, ndf=16)
  batch = {name: jax.ShapeDtypeStruct((8, 64, 64, 3), jnp.float32) for name in "AB"}
  state = jax.eval_shape(lambda: train.create_train_state(jax.random.key(0), pix2pix, batch))
  # A new function each time, so that JAX traces it again with the choices of the moment.
  temporary_bytes = lambda: jax.jit(functools.partial(train.train_step, pix2pix=pix2pix)).lower(
      state, batch).compile().memory_analysis().temp_size_in_bytes
  monkeypatch.setattr(tuning, "_choices", {})
  static = temporary_bytes()
  winograd = {key: "winograd" for key, site in tuning.step_sites(pix2pix, batch).items()
              if "winograd" in site.formulations}
  monkeypatch.setattr(tuning, "_choices", winograd)
  assert len(winograd) >= 6 and temporary_bytes() <= 1.25 * static


def test_winograd_competes_in_float32_where_it_applies():
  """Not in bf16 on CPU (its 9 batched products ran slower than the matmuls there), not for 3x3 kernels or
  on odd padded sides at stride 2, nor where matmul multiplies on the output side (one output channel)."""
  site = lambda shape, kernel, stride, dtype=jnp.float32: layers.conv_site(
      jax.ShapeDtypeStruct(shape, dtype), kernel, stride, 1, dtype).formulations
  assert "winograd" in site((1, 32, 32, 8), (4, 4, 8, 16), 2)
  assert "winograd" in site((1, 9, 9, 8), (4, 4, 8, 16), 1)
  assert "winograd" not in site((1, 32, 32, 8), (4, 4, 8, 16), 2, jnp.bfloat16)
  assert "winograd" not in site((1, 32, 32, 8), (3, 3, 8, 16), 2)
  assert "winograd" not in site((1, 31, 32, 8), (4, 4, 8, 16), 2)
  assert "winograd" not in site((1, 9, 9, 16), (4, 4, 16, 1), 1)
  upconv = lambda dtype: layers.ConvTranspose(16, dtype=dtype).tuning_site(jnp.zeros((1, 8, 8, 8))).formulations
  assert "winograd" in upconv(jnp.float32) and "winograd" not in upconv(jnp.bfloat16)


def test_stride_1_convs_keep_their_input_not_a_patch_matrix_by_default():
  """The PatchGAN's stride-1 layer at <= 32 px: the static choice keeps what XLA's own convolution
  keeps (its input and kernel), not im2col patches 16 times its input, in autodiff and compiled."""
  x = jax.ShapeDtypeStruct((4, 16, 16, 32), jnp.float32)
  site = layers.conv_site(x, (4, 4, 32, 64), 1, 1, jnp.float32)
  default = site.formulations[site.default]
  input_and_kernel = (x.size + 4 * 4 * 32 * 64) * 4
  assert tuning.kept_bytes(default, site) == input_and_kernel
  patches = 4 * 15 * 15 * 16 * 32 * 4

  def forward_and_gradients(x, kernel):
    y, vjp = jax.vjp(default, x, kernel)
    return vjp(y)

  compiled = jax.jit(forward_and_gradients).lower(x, site.kernel).compile()
  assert compiled.memory_analysis().temp_size_in_bytes < patches


def test_per_tap_products_compete_only_where_matmul_would_build_patches():
  """With one output channel (the PatchGAN's last layer) matmul multiplies on the output side,
  one product for all taps; per-tap products with one output column each only cost tuning time."""
  x = jax.ShapeDtypeStruct((2, 8, 8, 16), jnp.float32)
  last = layers.conv_site(x, (4, 4, 16, 1), 1, 1, jnp.float32)
  assert set(last.formulations) == {"xla", "matmul"} and last.default == "matmul"
  assert "taps" in layers.conv_site(x, (4, 4, 16, 32), 1, 1, jnp.float32).formulations


def test_the_static_table_runs_output_side_convolutions_as_matmul_at_every_side():
  """The PatchGAN's 1-channel last layer at 512 px (63 px input, under tuning.MIN_FLOPS, so never
  measured) ran XLA's convolution: 60 ms for its forward pass and gradients, where the matmul takes 7."""
  assert layers.resolve_conv_impl("auto", 63, output_side=True) == "matmul"
  last = layers.conv_site(jax.ShapeDtypeStruct((1, 63, 63, 512), jnp.float32), (4, 4, 512, 1), 1, 1,
                          jnp.float32)
  assert last.flops < tuning.MIN_FLOPS and last.default == "matmul"
  wide = layers.conv_site(jax.ShapeDtypeStruct((1, 63, 63, 512), jnp.float32), (4, 4, 512, 512), 1, 1,
                          jnp.float32)
  assert wide.default == "xla"


def test_odd_sides_keep_xlas_convolution():
  assert layers._input_gradient_as_matmul((1, 64, 64, 3), 4, 2, 1)
  assert not layers._input_gradient_as_matmul((1, 63, 64, 3), 4, 2, 1)
  assert not layers._input_gradient_as_matmul((1, 64, 64, 3), 3, 2, 1)
  x = jax.random.normal(jax.random.key(0), (1, 63, 63, 3))
  conv = lambda impl: layers.Conv(2, 4, 2, 1, use_bias=False, impl=impl)
  variables = conv("xla").init(jax.random.key(1), x)
  grad = lambda impl: jax.grad(lambda x: jnp.sum(conv(impl).apply(variables, x) ** 2))(x)
  np.testing.assert_array_equal(grad("auto"), grad("xla"))


def _dot_operand_dtypes(compiled_text):
  """The element types of every dot's two operands in a compiled HLO module."""
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", compiled_text))
  return [tuple(types[name] for name in operands)
          for operands in re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", compiled_text)]


# (m, k, n) that take each of the two ways of forming each gradient product.
@pytest.mark.parametrize("m, k, n", [(256, 256, 8), (8, 512, 64)])
def test_bfloat16_matmuls_on_cpu_give_float32_and_bf16_gradients(m, k, n):
  keys = jax.random.split(jax.random.key(0), 3)
  a, b = (jax.random.normal(key, shape).astype(jnp.bfloat16) for key, shape in zip(keys, [(m, k), (k, n)]))
  dy = jax.random.normal(keys[2], (m, n))
  y, vjp = jax.vjp(layers.matmul, a, b)
  da, db = vjp(dy)
  assert y.dtype == jnp.float32 and da.dtype == db.dtype == jnp.bfloat16
  f32 = lambda t: t.astype(jnp.float32)
  np.testing.assert_allclose(y, f32(a) @ f32(b), rtol=1e-5, atol=1e-4)
  dy = f32(dy.astype(jnp.bfloat16))
  np.testing.assert_allclose(f32(da), dy @ f32(b).T, rtol=1e-2, atol=1e-2 * np.sqrt(n))
  np.testing.assert_allclose(f32(db), f32(a).T @ dy, rtol=1e-2, atol=1e-2 * np.sqrt(m))


def test_bfloat16_training_runs_every_product_in_bf16_on_cpu():
  """XLA:CPU multiplies bf16 fast only with row-major operands; the gradient products must not
  fall back to float32 (they did with XLA's own transposes in the gradients)."""
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))
  conv = layers.Conv(64, 4, 2, 1, use_bias=False, impl="matmul", dtype=jnp.bfloat16)
  variables = conv.init(jax.random.key(1), x)
  loss = lambda params, x: jnp.sum(conv.apply({"params": params}, x) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables["params"], x).compile().as_text()
  operand_types = _dot_operand_dtypes(text)
  assert len(operand_types) == 3 and all(types == ("bf16", "bf16") for types in operand_types), operand_types


@pytest.mark.parametrize("conv", [layers.strided_conv_matmul, functools.partial(layers.conv_taps, padding=1)])
def test_bfloat16_matmul_convs_run_every_product_in_bf16_on_cpu(conv):
  """Their reason to be: the forward pass and the kernel's gradient, which XLA's convolutions
  would run in float32 on CPU, are bf16 products like the input gradient."""
  x, kernel = (t.astype(jnp.bfloat16) for t in _inputs(16, 32, 64, batch=2))
  loss = lambda x, kernel: jnp.sum(conv(x, kernel) ** 2)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, kernel).compile().as_text()
  operand_types = _dot_operand_dtypes(text)
  assert len(operand_types) == 3 and all(types == ("bf16", "bf16") for types in operand_types), operand_types
  assert " convolution(" not in text


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs inside it (loops, jitted and custom-gradient calls)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for inner in (param if isinstance(param, (tuple, list)) else (param,)):
        inner = getattr(inner, "jaxpr", inner)
        if hasattr(inner, "eqns"):
          yield from _equations(inner)


def test_per_tap_kernel_gradients_cut_transposed_windows_from_one_copy_of_the_input():
  """The backward loop multiplies each tap's window transposed. matmul's own gradient transposed
  every window inside the loop (for bf16 on CPU, as an array of its own: 2% of the bf16 step at
  256 px batch 4); in the loop only the tap's kernel may be transposed now."""
  x, kernel = (t.astype(jnp.bfloat16) for t in _inputs(8, 16, 32, batch=2))
  loss = lambda x, kernel: jnp.sum(layers.conv_taps(x, kernel, 1).astype(jnp.float32) ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, kernel).jaxpr
  loops = [eqn.params["jaxpr"].jaxpr for eqn in _equations(jaxpr) if eqn.primitive.name == "scan"]  # fori_loop
  in_loops = [eqn.invars[0].aval.size for body in loops for eqn in _equations(body)
              if eqn.primitive.name == "transpose"]
  assert len(loops) == 2 and in_loops and max(in_loops) <= 16 * 32, in_loops


_BF16_MATMUL_CONVS = {  # name: (convolution, its stride)
    "im2col, stride 2": (functools.partial(layers.conv_matmul, stride=2, padding=1), 2),
    "im2col, stride 1": (functools.partial(layers.conv_matmul, stride=1, padding=1), 1),
    "strided_conv_matmul": (layers.strided_conv_matmul, 2),
    "conv_taps": (functools.partial(layers.conv_taps, padding=1), 1),
}


@pytest.mark.parametrize("name", sorted(_BF16_MATMUL_CONVS))
def test_bfloat16_matmul_convs_move_bits_not_float32_on_cpu(name):
  """XLA:CPU pads, slices and concatenates bf16 in float32: im2col patches and padded inputs
  were written twice as large and converted back. They must be moved as bf16 bits, with
  gradients those of the float32 convolution to bf16's precision."""
  conv, stride = _BF16_MATMUL_CONVS[name]
  x, kernel = _inputs(16, 32, 64, batch=2)
  forward = jax.jit(conv).lower(x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)).compile().as_text()
  padded, patches = "f32[2,18,18,32]", ("f32[2,8,8,512]", "f32[2,15,15,512]")
  assert padded not in forward and not any(shape in forward for shape in patches)
  expected = _values_and_grads(functools.partial(layers.conv_xla, stride=stride, padding=1), x, kernel)
  got = _values_and_grads(lambda x, k: conv(x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)), x, kernel)
  for a, b in zip(got, expected):
    assert a.shape == b.shape
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) <= 2e-2 * float(jnp.max(jnp.abs(b)))


def test_bfloat16_layers_on_cpu_hand_on_float32():
  """XLA:CPU computes bf16 elementwise ops (norms, activations) through float32 conversions."""
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 16))
  for module in (layers.Conv(32, 4, 2, 1, use_bias=True, impl="matmul", dtype=jnp.bfloat16),
                 layers.ConvTranspose(8, impl="matmul", dtype=jnp.bfloat16)):
    variables = module.init(jax.random.key(1), x)
    assert module.apply(variables, x).dtype == jnp.float32
    grads = jax.jit(jax.grad(lambda v, x: jnp.sum(module.apply(v, x) ** 2), argnums=(0, 1)))(variables, x)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_other_transposed_convs_fall_back_to_the_plain_formulation():
  """The ResNet's 3x3/s2/p1/output_padding=1 layer has no matmul form: it must still be right."""
  assert layers.resolve_upconv_impl("matmul", 3, 2, 1, 1, side=5) == "conv_transpose"
  x = jax.random.normal(jax.random.key(0), (1, 5, 5, 3))
  module = layers.ConvTranspose(2, kernel_size=3, stride=2, padding=1, output_padding=1, impl="matmul")
  variables = module.init(jax.random.key(1), x)
  expected = layers.conv_transpose(x, variables["params"]["kernel"], 2, 1, 1)
  assert expected.shape == (1, 10, 10, 2)
  np.testing.assert_array_equal(module.apply(variables, x), expected)


def test_auto_has_a_static_cpu_table_for_shapes_never_measured():
  assert jax.default_backend() == "cpu"
  assert {layers.resolve_upconv_impl("auto", 4, 2, 1, 0, side) for side in (1, 8, 128)} == {"matmul"}
  assert layers.resolve_conv_impl("auto", 32) == "matmul"
  assert layers.resolve_conv_impl("auto", 64) == "xla"


def test_unknown_impls_are_named():
  with pytest.raises(ValueError, match=r"config.model.upconv_impl must be one of .*got 'fft'"):
    layers.resolve_upconv_impl("fft", 4, 2, 1, 0, side=8)
  with pytest.raises(ValueError, match=r"config.model.conv_impl must be one of .*got 'winograd'"):
    layers.resolve_conv_impl("winograd", 8)


def test_train_steps_is_train_step_in_sequence():
  """The multi-step call (lax.scan) gives the state and metrics of one call per step."""
  pix2pix = tiny_pix2pix()
  batches = {name: jax.random.uniform(jax.random.key(i), (2, 1, 32, 32, 3), minval=-1, maxval=1)
             for i, name in enumerate("AB")}
  state = train.create_train_state(jax.random.key(0), pix2pix, batches)
  step = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  expected, metrics = state, []
  for i in range(2):
    expected, m = step(expected, jax.tree_util.tree_map(lambda x: x[i], batches))
    metrics.append(m)
  got, got_metrics = jax.jit(functools.partial(train.train_steps, pix2pix=pix2pix))(state, batches)
  for name in pix2pix.metric_names:
    np.testing.assert_allclose(got_metrics[name], [m[name] for m in metrics], rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # Adam moves each weight by ~2e-4.


def test_batch_norm_under_pmap_uses_each_devices_statistics_unless_synchronised():
  """Without an axis each device normalises its share alone (the reference's DataParallel);
  with one, every device uses the statistics of the whole batch, running averages included."""
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
  x = x * jnp.arange(1.0, 9.0)[:, None, None, None]  # Shares with different statistics.
  variables = layers.BatchNorm().init(jax.random.key(1), x, use_running_average=False)

  def apply(module, images):
    return module.apply(variables, images, use_running_average=False, mutable=["batch_stats"])

  def on_4_devices(module):
    return jax.pmap(functools.partial(apply, module), axis_name="d")(x.reshape(4, 2, 4, 4, 3))

  own, own_stats = on_4_devices(layers.BatchNorm())
  whole, whole_stats = apply(layers.BatchNorm(), x)
  synced, synced_stats = on_4_devices(layers.BatchNorm(axis_name="d"))
  for device in range(4):
    alone, _ = apply(layers.BatchNorm(), x[2 * device:2 * device + 2])
    np.testing.assert_allclose(own[device], alone, atol=1e-5)
  assert not np.allclose(own.reshape(x.shape), whole, atol=1e-2)
  np.testing.assert_allclose(synced.reshape(x.shape), whole, atol=1e-5)
  jax.tree_util.tree_map(lambda s, w: np.testing.assert_allclose(s[0], w, rtol=1e-5),
                         synced_stats, whole_stats)


def _autodiff_batch_norm(x, scale, bias, axis_name=None):
  """The formula of ``BatchNorm``'s training mode, for autodiff: ``(y, mean, var)``."""
  xf = x.astype(jnp.float32)
  mean = jnp.mean(xf, (0, 1, 2))
  mean = mean if axis_name is None else lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(xf - mean), (0, 1, 2))
  var = var if axis_name is None else lax.pmean(var, axis_name)
  return ((xf - mean) * lax.rsqrt(var + 1e-5) * scale + bias).astype(x.dtype), mean, var


def test_batch_norm_gradients_are_autodiffs_with_and_without_a_device_axis():
  """BatchNorm's backward pass is written out (to keep its input alone): it must equal autodiff
  of the formula, the statistics' own cotangents, a channel at 300 +- 0.1 and pmean included."""
  keys = jax.random.split(jax.random.key(0), 6)
  x = jax.random.normal(keys[0], (8, 4, 4, 3)) * jnp.array([1.0, 3.0, 0.1]) + jnp.array([0.0, -2.0, 300.0])
  x = x * jnp.arange(1.0, 9.0)[:, None, None, None] ** 0.5  # Shares with different statistics.
  scale, bias = jax.random.normal(keys[1], (3,)), jax.random.normal(keys[2], (3,))
  dy, dmean, dvar = (jax.random.normal(keys[3], x.shape), jax.random.normal(keys[4], (4, 3)),
                     jax.random.normal(keys[5], (4, 3)))

  def values_and_grads(f, x, cotangents):
    outputs, vjp = jax.vjp(f, x, scale, bias)
    return outputs, vjp(cotangents)

  def on_4_devices(f):
    return jax.pmap(functools.partial(values_and_grads, f), axis_name="d")(
        x.reshape(4, 2, 4, 4, 3), (dy.reshape(4, 2, 4, 4, 3), dmean, dvar))

  def own(axis_name):
    return lambda x, s, b: layers._batch_normalized(x, s, b, 1e-5, axis_name)  # pylint: disable=protected-access

  one = (dy, dmean[0], dvar[0])
  pairs = [(values_and_grads(own(None), x, one), values_and_grads(_autodiff_batch_norm, x, one)),
           (on_4_devices(own("d")), on_4_devices(functools.partial(_autodiff_batch_norm, axis_name="d")))]
  for got, expected in pairs:
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
      assert a.shape == b.shape
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4 * float(jnp.max(jnp.abs(b))))


def test_batch_norm_keeps_only_its_input_for_the_backward_pass():
  """Autodiff of the formula keeps two float32 tensors of the input's size (centred and
  normalised): 8x a bf16 input's bytes. PyTorch's batch norm keeps its input."""
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 16), jnp.bfloat16)
  variables = layers.BatchNorm().init(jax.random.key(1), x, use_running_average=False)
  _, vjp = jax.vjp(lambda v, x: layers.BatchNorm().apply(v, x, use_running_average=False,
                                                           mutable=["batch_stats"])[0], variables, x)
  kept = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(vjp) if leaf.size >= x.size)
  assert kept == x.nbytes


@pytest.mark.parametrize("fast_math", [False, True])
def test_batch_norm_layers_hold_two_tensors_each_for_the_backward_pass(fast_math):
  """Each dense-and-batch-norm layer of a chain must hold its input and batch norm's, no more,
  in the compiled gradient. XLA computed the backward pass's centred input in the forward pass,
  where its operands are ready, and held it: three tensors a layer. Also with XLA:CPU's fast math,
  which folds ``0 * v``."""
  n_layers = 6
  x = jax.random.normal(jax.random.key(0), (8, 64, 64, 32))

  class Chain(nn.Module):
    @nn.compact
    def __call__(self, h):
      for _ in range(n_layers):
        h = nn.leaky_relu(layers.BatchNorm()(nn.Dense(32, use_bias=False)(h), use_running_average=False), 0.2)
      return h

  variables = Chain().init(jax.random.key(1), x)

  def loss(params):
    y, _ = Chain().apply({**variables, "params": params}, x, mutable=["batch_stats"])
    return jnp.sum(jnp.square(y))

  compiled = jax.jit(jax.grad(loss)).lower(variables["params"]).compile(
      compiler_options={"xla_cpu_enable_fast_math": fast_math})
  # Two at work beside what the layers hold; 19 when the centred inputs were held.
  assert compiled.memory_analysis().temp_size_in_bytes <= (2 * n_layers + 2) * x.nbytes + 2**16


def test_batch_norm_statistics_survive_a_large_mean():
  """A channel at 300 +- 0.1 (flat image regions give such channels): the one-pass
  E[x^2] - E[x]^2 loses its whole variance to float32 rounding."""
  x = 300.0 + 0.1 * jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
  bn = layers.BatchNorm()
  variables = bn.init(jax.random.key(1), x, use_running_average=False)
  y, _ = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  x64 = np.asarray(x, np.float64)
  params = variables["params"]
  expected = ((x64 - x64.mean((0, 1, 2))) / np.sqrt(x64.var((0, 1, 2)) + 1e-5) * params["scale"]
              + params["bias"])
  np.testing.assert_allclose(y, expected, rtol=1e-3, atol=1e-3)
