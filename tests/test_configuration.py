"""configuration: every bad value named before any work, old checkpoints' configs brought up to date."""

import ml_collections
import pytest

from p2p_jax import configuration
from tests.conftest import tiny_config


@pytest.mark.parametrize("overrides, message", [
    (dict(crop_size=64, load_size=36), r"config.crop_size=64 is larger than config.load_size=36"),
    (dict(crop_size=48, load_size=56), r"config.crop_size=48 cannot be halved 5 times.*num_downs=5"),
    (dict(preprocess="zoom"), r"config.preprocess must be one of .*got 'zoom'"),
    (dict(direction="AtoC"), r"config.direction must be one of .*got 'AtoC'"),
    (dict(batch_size=3), r"config.batch_size=3 must be a positive multiple of the number of devices, 2 "
                         r"\(2 process\(es\) x 1 local device\(s\)\)"),
    (dict(batch_size=0), r"config.batch_size must be a positive int, got 0"),
    (dict(input_nc=0), r"config.input_nc must be a positive int, got 0"),
    (dict(dataset_mode="colorization"), r"config.dataset_mode='colorization' translates L to ab: it needs "
                                        r"config.input_nc=1, config.output_nc=2 and config.direction='AtoB', got 3, 3"),
    (dict(dataset_mode="unaligned"), r"config.dataset_mode must be one of \('aligned', 'colorization'\)"),
    (dict(num_train_steps=-1, num_epochs=0),
     r"config.num_epochs=0 with config.num_train_steps=-1: set one of them to a positive number"),
])
def test_bad_values_are_named(overrides, message):
  config = tiny_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    configuration.check(config, num_devices=2, num_processes=2)


@pytest.mark.parametrize("key, value, message", [
    ("model.norm", "group", r"config.model.norm must be one of \('batch', 'instance', 'none'\), got 'group'"),
    ("model.conv_impl", "winograd", r"config.model.conv_impl must be one of .*got 'winograd'"),
    ("model.dtype", "int8", r"config.model.dtype must be one of .*got 'int8'"),
    ("model.n_layers_d", 5, r"config.crop_size=32 is too small for a discriminator with "
                            r"config.model.n_layers_d=5"),
    ("loss.gan_mode", "wgan", r"config.loss.gan_mode='wgan' is none of \('vanilla', 'lsgan', 'hinge'"),
    ("optim.optimizer", "adamm", r"config.optim.optimizer='adamm' is no optax function"),
    ("optim.schedule", "cosine", r"config.optim.schedule='cosine' is none of \('linear', 'constant'\)"),
    ("optim.lr_update", "mid_epoch", r"config.optim.lr_update must be one of \('start_of_epoch', 'end_of_epoch'\)"),
])
def test_bad_model_loss_and_optimizer_values_are_named(key, value, message):
  config = tiny_config()
  group, name = key.split(".")
  config[group][name] = value
  with pytest.raises(ValueError, match=message):
    configuration.check(config)


def test_a_value_of_the_wrong_type_in_a_config_file_is_named():
  config = tiny_config()
  del config["log_every_steps"]
  config.log_every_steps = 2.5  # As a preset file may define it; overrides keep the type.
  with pytest.raises(ValueError, match=r"config.log_every_steps must be a positive int, got 2.5"):
    configuration.check(config)


def test_the_default_config_passes():
  configuration.check(configuration.default_config())


def test_an_old_checkpoints_config_is_read_in_todays_keys():
  """As written before the optimiser became configurable, with the derived steps_per_epoch in it."""
  old = configuration.default_config().to_dict()
  old["optim"]["b1"], old["optim"]["b2"] = 0.4, 0.9
  del old["optim"]["kwargs"], old["optim"]["optimizer"], old["optim"]["schedule"]
  del old["model"]["discriminator"], old["loss"]["terms"], old["optim"]["lr_update"]
  old["steps_per_epoch"] = 400
  old["my_own_key"] = "kept"
  upgraded = configuration.upgrade(old)
  assert upgraded.optim.kwargs.to_dict() == {"b1": 0.4, "b2": 0.9}
  assert (upgraded.optim.optimizer, upgraded.optim.schedule, upgraded.model.discriminator) == (
      "adam", "linear", "patchgan")
  assert "steps_per_epoch" not in upgraded and "b1" not in upgraded.optim
  assert upgraded.my_own_key == "kept"
  # The schedule it trained with: stepped at the end of each epoch, before the key existed.
  assert upgraded.optim.lr_update == "end_of_epoch" != configuration.default_config().optim.lr_update
  expected = configuration.default_config()
  expected.optim.kwargs = ml_collections.ConfigDict({"b1": 0.4, "b2": 0.9})
  expected.optim.lr_update = "end_of_epoch"
  expected.my_own_key = "kept"
  configuration.check_compatible(upgraded, expected, "workdir=/w")


def test_flatten_and_upgrade_keep_empty_and_filled_groups():
  config = configuration.default_config()
  config.model.generator_kwargs.depth = 3
  flat = configuration.flatten(config)
  assert flat["model.generator_kwargs.depth"] == 3 and flat["model.discriminator_kwargs"] == {}
  assert configuration.upgrade(config.to_dict()).to_dict() == config.to_dict()
