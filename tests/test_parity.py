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


def _names(names, norm):
  """The layer names of a network with ``norm``: without norm layers there are none to name."""
  return [n for n in names if "norm" not in n] if norm == "none" else names


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


NORMS = ["batch", "instance", "none"]


@pytest.mark.parametrize("norm", NORMS)
def test_unet_generator_matches_reference(norm):
  torch_net = ref.UnetGenerator(3, 3, NUM_DOWNS, ngf=WIDTH, norm_layer=ref.get_norm_layer(norm))
  module = models.UNetGenerator(num_downs=NUM_DOWNS, ngf=WIDTH, norm=norm, use_dropout=False)
  inputs = [_images(2, SIZE, SIZE, 3, seed=1)]
  _check_forward(torch_net, torch_net, module, _names(ref.unet_layer_names(NUM_DOWNS), norm), inputs)


@pytest.mark.parametrize("norm", NORMS)
def test_resnet_generator_matches_reference(norm):
  torch_net = ref.ResnetGenerator(3, 3, ngf=WIDTH, norm_layer=ref.get_norm_layer(norm), n_blocks=2)
  module = models.ResnetGenerator(n_blocks=2, ngf=WIDTH, norm=norm, use_dropout=False)
  _check_forward(torch_net, torch_net, module, _names(ref.resnet_layer_names(2), norm),
                 [_images(2, 32, 32, 3, seed=2)])


def _torch_discriminator(n_layers, norm, ndf=WIDTH):
  norm_layer = ref.get_norm_layer(norm)
  if n_layers == 0:
    return ref.PixelDiscriminator(6, ndf, norm_layer=norm_layer)
  return ref.NLayerDiscriminator(6, ndf, n_layers=n_layers, norm_layer=norm_layer)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n_layers", [0, 1, 3])
def test_patch_discriminator_matches_reference(n_layers, norm):
  torch_net = _torch_discriminator(n_layers, norm)
  module = models.PatchDiscriminator(n_layers=n_layers, ndf=WIDTH, norm=norm)
  inputs = [_images(2, SIZE, SIZE, 3, seed=3), _images(2, SIZE, SIZE, 3, seed=4)]
  torch_forward = lambda a, b: torch_net(torch.cat([a, b], 1))
  _check_forward(torch_net, torch_forward, module, _names(ref.patch_layer_names(n_layers), norm), inputs)


def _assert_moments_agree(ours, reference, what):
  """Adam's moments, array by array: a wrong gradient scale or sign anywhere shows here.

  Each array within 1e-3 of its own largest moment: float32 gradients of two
  implementations differ in their last bits, and after the first step the
  parameters they update differ where the gradient was near zero (Adam's
  step there is set by those bits), which moves later gradients a little.
  """
  assert _layout(ours) == _layout(reference)
  flat_reference = flax.traverse_util.flatten_dict(reference)
  for path, value in flax.traverse_util.flatten_dict(ours).items():
    expected = flat_reference[path]
    np.testing.assert_allclose(value, expected, rtol=0, atol=1e-3 * np.abs(expected).max(),
                               err_msg=f"{what} {'/'.join(path)}")


def _assert_parameters_agree(ours, reference, near_zero, lr, what):
  """Parameters after the same Adam steps agree to lr/10, except where a gradient was near zero.

  Adam's step is lr * m / (sqrt(v) + eps) with eps = 1e-8: where a step's
  gradient is within a few eps of zero (``near_zero``: below 1e-5 of its
  array's largest at some step, in the reference) the step's size is set by
  the gradient's last bits, which two float32 implementations round
  differently. Such elements may differ; they must stay rare.
  """
  flat_reference = flax.traverse_util.flatten_dict(reference)
  flat_near_zero = flax.traverse_util.flatten_dict(near_zero)
  disagreements = total = 0
  for path, value in flax.traverse_util.flatten_dict(ours).items():
    off = np.abs(np.asarray(value) - flat_reference[path]) > lr / 10
    unexplained = off & ~flat_near_zero[path]
    assert not unexplained.any(), f"{what} {'/'.join(path)}: {int(unexplained.sum())} parameters differ"
    disagreements += int(off.sum())
    total += off.size
  assert disagreements <= 1e-3 * total, f"{what}: {disagreements} of {total} parameters differ"


def _near_zero_gradients(net, names, near_zero=None):
  """Where ``net``'s last gradients were below 1e-5 of their array's largest, or'ed into ``near_zero``."""
  gradients = ref.flax_variables(net, names, lambda p: p.grad)["params"]
  small = jax.tree_util.tree_map(lambda g: np.abs(g) < 1e-5 * np.abs(g).max(), gradients)
  return small if near_zero is None else jax.tree_util.tree_map(np.logical_or, near_zero, small)


def _generator_dropout_masks(pix2pix, state, source):
  """The masks the step draws for the generator, in forward order, already scaled by 1/keep.

  The generator's dropout modules are intercepted: each applies what it would
  draw (its own ``make_rng``, so the very mask of the step) to ones, and the
  result is recorded and applied to its input.
  """
  masks = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, flax.linen.Dropout) and context.method_name == "__call__":
      scaled_mask = next_fun(np.ones(args[0].shape, np.float32), *args[1:], **kwargs)
      masks.append(np.asarray(scaled_mask))
      return args[0] * scaled_mask
    return next_fun(*args, **kwargs)

  with flax.linen.intercept_methods(record):
    pix2pix.generator.apply({"params": state.g_params, "batch_stats": state.g_batch_stats}, source,
                            train=True, rngs={"dropout": train._dropout_key(state, None)}, mutable=["batch_stats"])
  return masks


STEPS = 3


@pytest.mark.parametrize("gan_mode", ["vanilla", "lsgan", "wgangp"])
def test_three_train_steps_match_reference_optimize_parameters(gan_mode):
  """Dropout on, the same masks on both sides; losses, parameters, Adam's moments and running stats."""
  config = tiny_config(num_downs=NUM_DOWNS, ngf=WIDTH, ndf=WIDTH, n_layers_d=3)
  config.loss.gan_mode = gan_mode
  torch.manual_seed(0)
  net_g = ref.UnetGenerator(3, 3, NUM_DOWNS, ngf=WIDTH, norm_layer=ref.get_norm_layer("batch"), use_dropout=True)
  net_d = ref.NLayerDiscriminator(6, WIDTH, n_layers=3, norm_layer=ref.get_norm_layer("batch"))
  for net in (net_g, net_d):
    ref.init_weights(net)
    _randomize_biases(net)
  given_dropouts = ref.give_dropout_masks(net_g)
  assert len(given_dropouts) == NUM_DOWNS - 5 == 1, "the reference's dropout blocks"
  g_names, d_names = ref.unet_layer_names(NUM_DOWNS), ref.patch_layer_names(3)
  batches = [{"A": _images(2, SIZE, SIZE, 3, seed=2 * i + 5), "B": _images(2, SIZE, SIZE, 3, seed=2 * i + 6)}
             for i in range(STEPS)]
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH)
  g_vars = _copy_weights(net_g, g_names, pix2pix.generator, batches[0]["A"])
  d_vars = _copy_weights(net_d, d_names, pix2pix.discriminator, batches[0]["A"], batches[0]["B"])
  # create_train_state's state, built from the copied weights (Adam starts from
  # zeros whatever the parameters) without compiling the initialisers.
  state = train.TrainState(
      step=np.int32(0), g_params=g_vars["params"], g_batch_stats=g_vars["batch_stats"],
      d_params=d_vars["params"], d_batch_stats=d_vars["batch_stats"],
      g_opt_state=pix2pix.g_optimizer.init(g_vars["params"]),
      d_opt_state=pix2pix.d_optimizer.init(d_vars["params"]),
      rng=jax.random.key_data(jax.random.key(0)))
  step = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  optim = config.optim
  adam = lambda net: torch.optim.Adam(net.parameters(), lr=optim.lr, betas=(optim.kwargs.b1, optim.kwargs.b2))
  adam_g, adam_d = adam(net_g), adam(net_d)

  near_zero = {"G": None, "D": None}
  for batch in batches:
    masks = _generator_dropout_masks(pix2pix, state, batch["A"])
    assert len(masks) == len(given_dropouts)
    for given, mask in zip(given_dropouts, masks):
      given.mask = _nchw(mask)
    state, metrics = step(state, batch)
    expected = ref.optimize_parameters(net_g, net_d, adam_g, adam_d, ref.GANLoss(gan_mode), _nchw(batch["A"]),
                                       _nchw(batch["B"]), config.loss.lambda_l1)
    metrics = {name: float(value) for name, value in metrics.items()}
    metrics["g_l1"] *= config.loss.lambda_l1  # the reference logs L1 already weighted
    for name in pix2pix.metric_names:
      np.testing.assert_allclose(metrics[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
    near_zero = {"G": _near_zero_gradients(net_g, g_names, near_zero["G"]),
                 "D": _near_zero_gradients(net_d, d_names, near_zero["D"])}

  for params, opt_state, net, names, optimizer, what in (
      (state.g_params, state.g_opt_state, net_g, g_names, adam_g, "G"),
      (state.d_params, state.d_opt_state, net_d, d_names, adam_d, "D")):
    adam_state = opt_state[0]  # optax.adam: (scale_by_adam's state, the schedule's)
    assert int(adam_state.count) == STEPS
    moments = {moment: ref.flax_variables(net, names, lambda p, m=torch_name: optimizer.state[p][m])["params"]
               for moment, torch_name in (("mu", "exp_avg"), ("nu", "exp_avg_sq"))}
    for moment, reference in moments.items():
      _assert_moments_agree(getattr(adam_state, moment), reference, f"{what} {moment}")
    _assert_parameters_agree(params, ref.flax_variables(net, names)["params"], near_zero[what], optim.lr, what)
  g_after, d_after = ref.flax_variables(net_g, g_names), ref.flax_variables(net_d, d_names)
  # Running stats: one update per step for G, three for D (fake, real, then fake for G's loss).
  _assert_trees_close(state.g_batch_stats, g_after["batch_stats"], rtol=1e-4, atol=1e-5)
  _assert_trees_close(state.d_batch_stats, d_after["batch_stats"], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_networks_have_the_reference_parameters(name, norm):
  torch_factory, module_factory, names, num_inputs = FULL_SIZE[name]
  names = _names(names, norm)
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
