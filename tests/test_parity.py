"""Parity with the PyTorch reference: same weights give the same outputs and the same train step."""

import functools

import flax
import jax
import numpy as np
import pytest
import torch

from p2p_jax import layers, models, recipe, train
from tests import torch_reference as ref
from tests.conftest import STEPS_PER_EPOCH, tiny_config

SIZE = 64
NUM_DOWNS = 6
WIDTH = 8  # ngf and ndf
# float32 networks of a few dozen layers agree to ~1e-6; the issue asks <= 1e-4.
OUTPUT_ATOL = 1e-4


def _images(*shape, seed):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _randomize_biases(net):
  # The reference initialises biases to 0; non-zero ones show a bias copied to the wrong layer.
  with torch.no_grad():
    for name, param in net.named_parameters():
      if name.endswith("bias"):
        param.normal_(0.0, 0.1)


def _layout(variables):
  return {"/".join(path): leaf.shape for path, leaf in flax.traverse_util.flatten_dict(variables).items()}


def _assert_same_layout(template, variables):
  assert _layout(variables) == _layout(template), "the torch layers do not map onto the Flax variables"


def _assert_trees_close(actual, expected, **tolerance):
  assert _layout(actual) == _layout(expected)
  flat_expected = flax.traverse_util.flatten_dict(expected)
  for path, value in flax.traverse_util.flatten_dict(actual).items():
    np.testing.assert_allclose(value, flat_expected[path], err_msg="/".join(path), **tolerance)


def _copy_weights(torch_net, names, module, *inputs):
  variables = ref.flax_variables(torch_net, names)
  init = functools.partial(module.init, train=False)
  _assert_same_layout(jax.eval_shape(init, jax.random.key(0), *inputs), variables)
  return variables


def _check_forward(torch_net, torch_forward, module, names, inputs):
  """Train mode, the running statistics it moves, then eval mode, all as the reference."""
  torch_net.train()
  torch.manual_seed(0)
  ref.init_weights(torch_net)
  _randomize_biases(torch_net)
  variables = _copy_weights(torch_net, names, module, *inputs)
  torch_inputs = [_nchw(x) for x in inputs]

  with torch.no_grad():
    expected = _nhwc(torch_forward(*torch_inputs))
  out, updated = module.apply(variables, *inputs, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(out, expected, atol=OUTPUT_ATOL, rtol=0)
  moved = ref.flax_variables(torch_net, names)
  # PyTorch keeps the unbiased running variance; so must we.
  _assert_trees_close(updated.get("batch_stats", {}), moved["batch_stats"], rtol=1e-5, atol=1e-6)

  torch_net.eval()
  with torch.no_grad():
    expected_eval = _nhwc(torch_forward(*torch_inputs))
  out_eval = module.apply(moved, *inputs, train=False)
  np.testing.assert_allclose(out_eval, expected_eval, atol=OUTPUT_ATOL, rtol=0)
  if moved["batch_stats"]:
    # Running averages, not batch statistics: the two modes must differ.
    assert np.abs(out_eval - out).max() > 100 * OUTPUT_ATOL


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_unet_generator_matches_reference(norm):
  torch_net = ref.UnetGenerator(3, 3, NUM_DOWNS, ngf=WIDTH, norm_layer=ref.get_norm_layer(norm))
  module = models.UNetGenerator(num_downs=NUM_DOWNS, ngf=WIDTH, norm=norm, use_dropout=False)
  inputs = [_images(2, SIZE, SIZE, 3, seed=1)]
  _check_forward(torch_net, torch_net, module, ref.unet_layer_names(NUM_DOWNS), inputs)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_resnet_generator_matches_reference(norm):
  torch_net = ref.ResnetGenerator(3, 3, ngf=WIDTH, norm_layer=ref.get_norm_layer(norm), n_blocks=2)
  module = models.ResnetGenerator(n_blocks=2, ngf=WIDTH, norm=norm, use_dropout=False)
  _check_forward(torch_net, torch_net, module, ref.resnet_layer_names(2), [_images(2, 32, 32, 3, seed=2)])


def _torch_discriminator(n_layers, norm, ndf=WIDTH):
  norm_layer = ref.get_norm_layer(norm)
  if n_layers == 0:
    return ref.PixelDiscriminator(6, ndf, norm_layer=norm_layer)
  return ref.NLayerDiscriminator(6, ndf, n_layers=n_layers, norm_layer=norm_layer)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_patch_discriminator_matches_reference(n_layers, norm):
  torch_net = _torch_discriminator(n_layers, norm)
  module = models.PatchDiscriminator(n_layers=n_layers, ndf=WIDTH, norm=norm)
  inputs = [_images(2, SIZE, SIZE, 3, seed=3), _images(2, SIZE, SIZE, 3, seed=4)]
  torch_forward = lambda a, b: torch_net(torch.cat([a, b], 1))
  _check_forward(torch_net, torch_forward, module, ref.patch_layer_names(n_layers), inputs)


def _assert_adam_steps_agree(after, reference_after, before, lr):
  """Compares one Adam step from the same parameters, ours against the reference's.

  Adam's first step is lr * g / (|g| + eps), eps = 1e-8: +-lr within 10%
  wherever |g| > 9 eps, and there the two steps must agree to lr/20. Where the
  gradient is within a few eps of zero (the reference moved less than 0.9 lr)
  the step is set by the gradient's last bits, which two float32
  implementations round differently; such disagreements must stay rare.
  """
  assert _layout(after) == _layout(reference_after) == _layout(before)
  flat_reference = flax.traverse_util.flatten_dict(reference_after)
  flat_before = flax.traverse_util.flatten_dict(before)
  disagreements = total = 0
  for path, value in flax.traverse_util.flatten_dict(after).items():
    ours = np.asarray(value) - flat_before[path]
    reference = flat_reference[path] - flat_before[path]
    off = np.abs(ours - reference) > lr / 20
    near_zero_gradient = np.abs(reference) < 0.9 * lr
    wrong = int(np.sum(off & ~near_zero_gradient))
    assert wrong == 0, (f"{'/'.join(path)}: {wrong} steps differ, by up to "
                        f"{np.abs(ours - reference).max() / lr:.3f} lr")
    disagreements += off.sum()
    total += off.size
  assert disagreements <= 1e-3 * total


@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan"])
def test_train_step_matches_reference_optimize_parameters(gan_mode):
  config = tiny_config(num_downs=NUM_DOWNS, ngf=WIDTH, ndf=WIDTH, n_layers_d=3, use_dropout=False)
  config.loss.gan_mode = gan_mode
  torch.manual_seed(0)
  net_g = ref.UnetGenerator(3, 3, NUM_DOWNS, ngf=WIDTH, norm_layer=ref.get_norm_layer("batch"))
  net_d = ref.NLayerDiscriminator(6, WIDTH, n_layers=3, norm_layer=ref.get_norm_layer("batch"))
  for net in (net_g, net_d):
    ref.init_weights(net)
    _randomize_biases(net)
  g_names, d_names = ref.unet_layer_names(NUM_DOWNS), ref.patch_layer_names(3)
  batch = {"A": _images(2, SIZE, SIZE, 3, seed=5), "B": _images(2, SIZE, SIZE, 3, seed=6)}
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH)
  g_vars = _copy_weights(net_g, g_names, pix2pix.generator, batch["A"])
  d_vars = _copy_weights(net_d, d_names, pix2pix.discriminator, batch["A"], batch["B"])
  # create_train_state's state, built from the copied weights (Adam starts from
  # zeros whatever the parameters) without compiling the initialisers.
  state = train.TrainState(
      step=np.int32(0), g_params=g_vars["params"], g_batch_stats=g_vars["batch_stats"],
      d_params=d_vars["params"], d_batch_stats=d_vars["batch_stats"],
      g_opt_state=pix2pix.g_optimizer.init(g_vars["params"]),
      d_opt_state=pix2pix.d_optimizer.init(d_vars["params"]),
      rng=jax.random.key_data(jax.random.key(0)))
  state, metrics = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))(state, batch)

  optim = config.optim
  adam = lambda net: torch.optim.Adam(net.parameters(), lr=optim.lr, betas=(optim.kwargs.b1, optim.kwargs.b2))
  expected = ref.optimize_parameters(net_g, net_d, adam(net_g), adam(net_d), ref.GANLoss(gan_mode),
                                     _nchw(batch["A"]), _nchw(batch["B"]), config.loss.lambda_l1)

  metrics = {name: float(value) for name, value in metrics.items()}
  metrics["g_l1"] *= config.loss.lambda_l1  # the reference logs L1 already weighted
  for name in pix2pix.metric_names:
    np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-5, err_msg=name)
  g_after, d_after = ref.flax_variables(net_g, g_names), ref.flax_variables(net_d, d_names)
  _assert_adam_steps_agree(state.g_params, g_after["params"], g_vars["params"], optim.lr)
  _assert_adam_steps_agree(state.d_params, d_after["params"], d_vars["params"], optim.lr)
  # One running-stat update for G, three for D (fake, real, then fake for G's loss).
  _assert_trees_close(state.g_batch_stats, g_after["batch_stats"], rtol=1e-5, atol=1e-6)
  _assert_trees_close(state.d_batch_stats, d_after["batch_stats"], rtol=1e-5, atol=1e-6)


# The reference's full-size networks: torch factory, ours, our layer names, inputs.
FULL_SIZE = {
    "unet_256": (lambda norm: ref.UnetGenerator(3, 3, 8, 64, norm_layer=ref.get_norm_layer(norm)),
                 lambda norm: models.UNetGenerator(num_downs=8, norm=norm), ref.unet_layer_names(8), 1),
    "resnet_9blocks": (lambda norm: ref.ResnetGenerator(3, 3, 64, norm_layer=ref.get_norm_layer(norm), n_blocks=9),
                       lambda norm: models.ResnetGenerator(n_blocks=9, norm=norm), ref.resnet_layer_names(9), 1),
    "basic_D": (lambda norm: _torch_discriminator(3, norm, ndf=64),
                lambda norm: models.PatchDiscriminator(n_layers=3, norm=norm), ref.patch_layer_names(3), 2),
    "pixel_D": (lambda norm: _torch_discriminator(0, norm, ndf=64),
                lambda norm: models.PatchDiscriminator(n_layers=0, norm=norm), ref.patch_layer_names(0), 2),
}


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_networks_have_the_reference_parameters(name, norm):
  torch_factory, module_factory, names, num_inputs = FULL_SIZE[name]
  torch_net = torch_factory(norm)
  image = jax.ShapeDtypeStruct((1, 256, 256, 3), np.float32)
  init = functools.partial(module_factory(norm).init, train=False)
  shapes = jax.eval_shape(init, jax.random.key(0), *[image] * num_inputs)
  # Layer by layer, then the totals.
  _assert_same_layout(shapes, ref.flax_variables(torch_net, names))
  assert layers.count_params(shapes["params"]) == sum(p.numel() for p in torch_net.parameters())


def test_reference_counts_are_the_published_ones():
  # What the reference prints for pix2pix's defaults: the helper is the reference.
  count = lambda net: sum(p.numel() for p in net.parameters())
  assert count(ref.UnetGenerator(3, 3, 8, 64, norm_layer=ref.get_norm_layer("batch"))) == 54_413_955
  assert count(ref.NLayerDiscriminator(6, 64, 3, norm_layer=ref.get_norm_layer("batch"))) == 2_768_705
