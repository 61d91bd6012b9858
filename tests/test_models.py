"""Shapes, parameter counts, receptive fields, init and modes of the networks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from p2p_jax import layers, models


def _init_shapes(module, *inputs):
  return jax.eval_shape(lambda *x: module.init({"params": jax.random.key(0)}, *x, train=False), *inputs)


def _output_shape(module, *inputs):
  def forward(*x):
    return module.apply(module.init({"params": jax.random.key(0)}, *x, train=False), *x, train=False)
  return jax.eval_shape(forward, *inputs).shape


@pytest.mark.parametrize("num_downs,size", [(8, 256), (7, 128)])
def test_unet_keeps_the_image_shape(num_downs, size):
  x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  assert _output_shape(models.UNetGenerator(num_downs=num_downs), x) == (2, size, size, 3)


@pytest.mark.parametrize("size,logits", [(256, 30), (128, 14)])
def test_patchgan_logit_map(size, logits):
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  assert _output_shape(models.PatchDiscriminator(), x, x) == (1, logits, logits, 1)
  assert models.patch_output_size(3, size) == logits


def test_resnet_generator_keeps_the_image_shape():
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  assert _output_shape(models.ResnetGenerator(), x) == (1, 256, 256, 3)


def test_parameter_counts_match_the_pytorch_reference():
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  assert layers.count_params(_init_shapes(models.UNetGenerator(), x)["params"]) == 54_413_955
  assert layers.count_params(_init_shapes(models.PatchDiscriminator(), x, x)["params"]) == 2_768_705


@pytest.mark.parametrize("n_layers,field", [(0, 1), (1, 16), (2, 34), (3, 70), (5, 286)])
def test_receptive_field_formula(n_layers, field):
  assert models.receptive_field(n_layers) == field


@pytest.mark.parametrize("n_layers", [0, 1, 3, 5])
def test_receptive_field_is_what_one_logit_sees(n_layers):
  """The input region with a non-zero gradient for one central logit has the computed size."""
  field = models.receptive_field(n_layers)
  size = 32 * (field // 32 + 2)
  disc = models.PatchDiscriminator(n_layers=n_layers, ndf=2, norm="none")
  a = jax.random.normal(jax.random.key(0), (1, size, size, 3))
  b = jax.random.normal(jax.random.key(1), (1, size, size, 3))
  variables = disc.init({"params": jax.random.key(2)}, a, b, train=False)

  def central_logit(a):
    logits = disc.apply(variables, a, b, train=False)
    return logits[0, logits.shape[1] // 2, logits.shape[2] // 2, 0]

  grad = np.abs(np.asarray(jax.grad(central_logit)(a)[0])).sum(-1)
  rows, cols = np.nonzero(grad.sum(1))[0], np.nonzero(grad.sum(0))[0]
  # The padding can cut the field at the border, so the logit is a central one.
  assert rows.max() - rows.min() + 1 == field
  assert cols.max() - cols.min() + 1 == field


def test_reference_initialisation():
  x = jnp.zeros((1, 64, 64, 3))
  unet = models.UNetGenerator(num_downs=6, ngf=32)
  params = jax.jit(lambda x: unet.init({"params": jax.random.key(0)}, x, train=False))(x)["params"]
  assert abs(float(jnp.std(params["down_1"]["kernel"])) - 0.02) < 2e-3
  scale = params["down_norm_1"]["bn"]["scale"]
  assert abs(float(jnp.mean(scale)) - 1.0) < 0.01 and 0.01 < float(jnp.std(scale)) < 0.03
  assert not np.any(params["up_0"]["bias"])
  assert "bias" not in params["down_1"], "no conv bias in front of batch norm, as the reference"


@pytest.fixture(scope="module")
def small_unet():
  # 6 levels: the smallest U-Net with a dropout block (the reference has num_downs - 5).
  unet = models.UNetGenerator(num_downs=6, ngf=8)
  x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3), minval=-1, maxval=1)
  return unet, jax.jit(lambda x: unet.init({"params": jax.random.key(1)}, x, train=False))(x), x


def test_dropout_is_drawn_from_the_dropout_rng_in_train_mode(small_unet):
  unet, variables, x = small_unet
  run = lambda key: unet.apply(variables, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])[0]
  np.testing.assert_array_equal(run(jax.random.key(0)), run(jax.random.key(0)))
  assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))
  np.testing.assert_array_equal(unet.apply(variables, x, train=False), unet.apply(variables, x, train=False))


def test_paper_test_mode_uses_batch_statistics_and_leaves_running_stats_alone(small_unet):
  """Train mode without a mutable batch_stats: normalised by the batch, running stats never written.

  Flax refuses a write to an immutable collection, so a batch norm that
  updated its running statistics in this mode would raise here.
  """
  unet, variables, x = small_unet
  paper = unet.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
  assert paper.shape == x.shape
  assert not np.allclose(paper, unet.apply(variables, x, train=False), atol=1e-3)
  _, updated = unet.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)},
                          mutable=["batch_stats"])
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), variables["batch_stats"],
                                 updated["batch_stats"])
  assert all(jax.tree_util.tree_leaves(moved)), "with batch_stats mutable, train mode would write them"


@pytest.mark.parametrize("norm, biased", [("instance", True), ("none", False)])
def test_other_norms_run_with_the_references_biases(norm, biased):
  """The reference gives convs a bias only in front of instance norm (use_bias), none without a norm."""
  x = jnp.ones((1, 32, 32, 3))
  unet = models.UNetGenerator(num_downs=5, ngf=8, norm=norm)
  variables = unet.init({"params": jax.random.key(0)}, x, train=False)
  assert "batch_stats" not in variables
  assert ("bias" in variables["params"]["down_1"]) == biased
  assert "bias" in variables["params"]["up_0"], "the outermost transposed conv always has one"
  assert unet.apply(variables, x, train=False).shape == x.shape


def test_instance_norm_statistics_survive_a_large_mean():
  """A channel at 300 +- 0.1: the one-pass E[x^2] - E[x]^2 loses its whole variance to float32 rounding."""
  x = 300.0 + 0.1 * jax.random.normal(jax.random.key(0), (2, 8, 8, 2))
  y = layers.Norm("instance").apply({}, x, train=True)
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean((1, 2), keepdims=True), x64.var((1, 2), keepdims=True)
  np.testing.assert_allclose(y, (x64 - mean) / np.sqrt(var + 1e-5), rtol=1e-3, atol=1e-3)


def test_dropout_sits_where_the_references_does():
  """unet_256 with dropout: the same number of dropout layers, on activations of the same shapes, in order."""
  import torch  # pylint: disable=g-import-not-at-top
  from tests import torch_reference as ref  # pylint: disable=g-import-not-at-top
  unet = models.UNetGenerator(num_downs=8, ngf=2)
  x = jnp.zeros((1, 256, 256, 3))
  variables = unet.init({"params": jax.random.key(0)}, x, train=False)
  _, captured = unet.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"],
                           capture_intermediates=lambda module, _: isinstance(module, nn.Dropout))
  ours = [value["__call__"][0].shape[1:] for value in captured["intermediates"].values()]
  torch_net = ref.UnetGenerator(3, 3, 8, ngf=2, norm_layer=ref.get_norm_layer("batch"), use_dropout=True)
  theirs = []
  for module in torch_net.modules():
    if isinstance(module, torch.nn.Dropout):
      module.register_forward_hook(lambda m, inputs, output: theirs.append(tuple(output.shape[2:]) + output.shape[1:2]))
  torch_net(torch.zeros(1, 3, 256, 256))
  assert ours == [tuple(shape) for shape in theirs] == [(4, 4, 16), (8, 8, 16), (16, 16, 16)]


def test_unknown_norm_is_named():
  with pytest.raises(ValueError, match="norm must be 'batch', 'instance' or 'none', got 'group'"):
    models.UNetGenerator(num_downs=5, ngf=8, norm="group").init(
        {"params": jax.random.key(0)}, jnp.ones((1, 32, 32, 3)), train=False)


def test_an_unknown_builtin_generator_is_named(config):
  config.model.generator = "transformer"
  with pytest.raises(ValueError, match=r"config.model.generator='transformer' is none of the built-in "
                                       r"generators \('unet', 'resnet'\)"):
    models.make_generator(config.model, 3)


@pytest.mark.parametrize("module, multiple", [(models.UNetGenerator(num_downs=5), 32),
                                              (models.ResnetGenerator(), 4)])
def test_generators_say_what_their_input_sides_must_be_a_multiple_of(module, multiple):
  assert module.size_multiple == multiple
  x = jax.ShapeDtypeStruct((1, 2 * multiple, 3 * multiple, 3), jnp.float32)
  assert _output_shape(module, x) == x.shape


def test_the_patchgan_sows_each_hidden_activation():
  disc = models.PatchDiscriminator(n_layers=2, ndf=4)
  x = jnp.ones((1, 32, 32, 3))
  variables = disc.init(jax.random.key(0), x, x, train=False)
  _, state = disc.apply(variables, x, x, train=False, mutable=["intermediates"])
  shapes = {name: value[0].shape for name, value in state["intermediates"].items()}
  assert shapes == {"features_0": (1, 16, 16, 4), "features_1": (1, 8, 8, 8), "features_2": (1, 7, 7, 16)}


def test_the_unets_relu_of_a_concatenation_keeps_no_copy_of_the_concatenation():
  """Each half's ReLU, concatenated: the values of the ReLU of the concatenation, and the compiled
  backward pass keeps one tensor of the concatenation's size where ReLU after it keeps two."""
  skip, h = (jax.random.normal(jax.random.key(i), (4, 32, 32, 16)) for i in range(2))
  kernel = jax.random.normal(jax.random.key(2), (32, 8))

  def loss(relu_of_concatenation, skip, h, kernel):
    # A product (which keeps its input for the kernel's gradient) after it, as a decoder block's.
    return jnp.sum(jnp.square(relu_of_concatenation(skip, h) @ kernel))

  plain = lambda skip, h: nn.relu(jnp.concatenate([skip, h], axis=-1))
  np.testing.assert_array_equal(models.relu_of_concatenation(skip, h), plain(skip, h))

  def temporary_bytes(relu_of_concatenation):
    grads = jax.jit(jax.grad(lambda *args: loss(relu_of_concatenation, *args), argnums=(0, 1, 2)))
    return grads.lower(skip, h, kernel).compile().memory_analysis().temp_size_in_bytes

  concatenation_bytes = 2 * skip.nbytes
  assert temporary_bytes(plain) - temporary_bytes(models.relu_of_concatenation) >= concatenation_bytes
