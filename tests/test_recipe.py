"""Pix2Pix: own networks, losses, terms and optimisers, from objects or import paths; named errors."""

import functools
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from p2p_jax import configuration, losses, recipe, train
from tests.conftest import STEPS_PER_EPOCH, tiny_config, tiny_pix2pix

# A module of the user's own, imported by path in the tests below.
USER_MODULE = textwrap.dedent('''
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    class TwoConvs(nn.Module):
      """A generator unlike the built-in ones: two 3x3 convolutions and dropout."""
      width: int = 4
      out_channels: int = 3

      @nn.compact
      def __call__(self, x, train: bool):
        h = nn.relu(nn.Conv(self.width, (3, 3))(x))
        h = nn.Dropout(0.5, deterministic=not train)(h)
        return jnp.tanh(nn.Conv(self.out_channels, (3, 3))(h))

    class NoTrainFlag(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Conv(3, (3, 3))(x)

    class Shrinks(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool):
        return nn.Conv(3, (3, 3), strides=2)(x)

    def not_a_module():
      return 42

    def squared_logits(logits, target_is_real, for_discriminator=True):
      return jnp.mean(jnp.square(logits - (1.0 if target_is_real else -1.0)))

    def mean_fake(inputs):
      return jnp.mean(inputs.fake)

    def clipped_adam(learning_rate, clip):
      return optax.chain(optax.clip_by_global_norm(clip), optax.adam(learning_rate))

    def halving(optim, steps_per_epoch, total_steps):
      return optax.exponential_decay(optim.lr, total_steps, 0.5)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "user_nets.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield
  sys.modules.pop("user_nets", None)


def _batch(n=2, size=32):
  source = jax.random.uniform(jax.random.key(0), (n, size, size, 3), minval=-1, maxval=1)
  return {"A": source, "B": jnp.flip(source, -1) * 0.5}


def _train(pix2pix, steps=2, batch=None):
  batch = _batch() if batch is None else batch
  state = train.create_train_state(jax.random.key(0), pix2pix, batch)
  step = jax.jit(functools.partial(train.train_step, pix2pix=pix2pix))
  history = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return state, history


def test_own_networks_and_loss_terms_train_as_objects(user_module):
  """A different generator, the built-in PatchGAN, hinge loss and a feature-matching term."""
  import user_nets  # pylint: disable=g-import-not-at-top

  def feature_matching(inputs: losses.LossInputs):
    _, real_features = inputs.discriminate(inputs.target)
    pairs = zip(jax.tree_util.tree_leaves(inputs.fake_features), jax.tree_util.tree_leaves(real_features))
    return sum(jnp.mean(jnp.abs(f - jax.lax.stop_gradient(r))) for f, r in pairs)

  base = tiny_pix2pix()
  pix2pix = base.replace(generator=user_nets.TwoConvs(), gan_loss=losses.hinge,
                         g_losses={**base.g_losses, "fm": (10.0, feature_matching)})
  state, history = _train(pix2pix, steps=3)
  assert pix2pix.metric_names == ("d_real", "d_fake", "d_loss", "g_gan", "g_l1", "g_fm", "g_loss")
  assert set(history[0]) == set(pix2pix.metric_names)
  for m in history:
    assert m["g_loss"] == pytest.approx(m["g_gan"] + 100 * m["g_l1"] + 10 * m["g_fm"], rel=1e-5)
  assert history[0]["g_fm"] > 0 and set(state.g_params) == {"Conv_0", "Conv_1"}


def test_features_from_discriminate_leave_the_running_statistics_alone():
  """A term that runs the discriminator again changes the loss, not D's batch statistics."""
  base = tiny_pix2pix()
  with_term = base.replace(g_losses={**base.g_losses, "d_fake_again": (
      1.0, lambda inputs: jnp.mean(inputs.discriminate(inputs.fake)[0]))})
  plain_state, _ = _train(base, steps=1)
  term_state, history = _train(with_term, steps=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, term_state.d_batch_stats, plain_state.d_batch_stats)
  assert np.isfinite(history[0]["g_d_fake_again"])
  assert not np.allclose(term_state.g_params["up_0"]["kernel"], plain_state.g_params["up_0"]["kernel"])


def test_optimisers_are_any_optax_transformation():
  base = tiny_pix2pix()
  sgd = base.replace(g_optimizer=optax.sgd(0.0), d_optimizer=optax.sgd(0.0))
  before = train.create_train_state(jax.random.key(0), sgd, _batch())
  after, _ = _train(sgd, steps=1)
  jax.tree_util.tree_map(np.testing.assert_array_equal, after.g_params, before.g_params)


def test_networks_losses_and_optimisers_by_import_path(user_module):
  config = tiny_config()
  config.model.generator = "user_nets:TwoConvs"
  config.model.generator_kwargs.width = 6
  config.loss.gan_mode = "user_nets:squared_logits"
  config.loss.terms.mean_fake = {"fn": "user_nets:mean_fake", "weight": 2.0}
  config.optim.optimizer = "user_nets:clipped_adam"
  config.optim.kwargs = {"clip": 1.0}
  config.optim.schedule = "user_nets:halving"
  pix2pix = configuration.check(config)
  assert type(pix2pix.generator).__name__ == "TwoConvs" and pix2pix.generator.width == 6
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH)
  assert float(pix2pix.learning_rate(config.num_epochs * STEPS_PER_EPOCH)) == pytest.approx(1e-4)
  _, history = _train(pix2pix)
  assert set(history[0]) == {"d_real", "d_fake", "d_loss", "g_gan", "g_l1", "g_mean_fake", "g_loss"}


def test_optax_names_and_the_constant_schedule():
  config = tiny_config()
  config.optim.optimizer, config.optim.kwargs = "adamw", {"weight_decay": 0.1}
  config.optim.schedule = "constant"
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=STEPS_PER_EPOCH)
  assert float(pix2pix.learning_rate(10 ** 6)) == pytest.approx(config.optim.lr)
  _train(pix2pix, steps=1)


@pytest.mark.parametrize("key, value, message", [
    ("model.generator", "no_such_package.nets:Net",
     r"config.model.generator='no_such_package.nets:Net': cannot import 'no_such_package.nets'"),
    ("model.generator", "user_nets:Missing", r"config.model.generator='user_nets:Missing': 'user_nets' has no "
                                             r"attribute 'Missing'"),
    ("model.generator", "user_nets:not_a_module",
     r"config.model.generator='user_nets:not_a_module' gave a int, not a Flax module"),
    ("model.generator", "user_nets:NoTrainFlag",
     r"config.model.generator='user_nets:NoTrainFlag': the generator user_nets.NoTrainFlag fails on "
     r"generator.apply\(variables, <1x32x32x3 image>, train=False\): TypeError: .*'train'"),
    ("model.generator", "user_nets:Shrinks",
     r"config.model.generator='user_nets:Shrinks': the generator user_nets.Shrinks returns \(1, 16, 16, 3\) "
     r"for a \(1, 32, 32, 3\) source; the step needs the target's shape, \(1, 32, 32, 3\)"),
    ("model.discriminator", "user_nets:TwoConvs",
     r"config.model.discriminator='user_nets:TwoConvs': the discriminator user_nets.TwoConvs fails on "
     r"discriminator.apply\(variables, <1x32x32x3 image>, <1x32x32x3 image>, train=False\): TypeError"),
    ("loss.gan_mode", "user_nets:nothing", r"config.loss.gan_mode='user_nets:nothing': 'user_nets' has no"),
    ("optim.optimizer", "user_nets:clipped_adam",
     r"config.optim.optimizer='user_nets:clipped_adam' cannot be built with learning_rate and "
     r"config.optim.kwargs=\{'b1': 0.5, 'b2': 0.999\}: .*unexpected keyword argument 'b1'"),
])
def test_import_paths_that_do_not_resolve_or_fit_name_the_key(user_module, key, value, message):
  config = tiny_config()
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ValueError, match=message):
    configuration.check(config)


def test_a_term_that_is_not_a_path_and_weight_is_named():
  config = tiny_config()
  config.loss.terms.fm = {"fn": "user_nets:mean_fake"}
  with pytest.raises(ValueError, match=r"config.loss.terms.fm must be a dict with keys 'fn' .* and 'weight'"):
    configuration.check(config)


class _NoTrainFlag(nn.Module):
  @nn.compact
  def __call__(self, x):
    return x


def test_objects_that_do_not_fit_are_named_by_role():
  pix2pix = tiny_pix2pix().replace(generator=_NoTrainFlag())
  with pytest.raises(ValueError, match=r"^the generator tests.test_recipe._NoTrainFlag fails on generator.apply"):
    configuration.check(tiny_config(), pix2pix=pix2pix)
