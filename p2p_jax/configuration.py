"""The run configuration: every key p2p_jax reads, its checks, and old configs brought up to date.

``default_config()`` is the paper's and the reference's pix2pix (facades, 256
px, batch 1); the presets in ``experiments/configs`` start from it. ``check``
runs once, before a run reads data or writes anything, and names the first
key whose value cannot work. A checkpoint keeps the config it was trained
with; ``upgrade`` turns one written by an older p2p_jax into today's keys
(``check_compatible`` then compares it with the config of a resumed run).
Errors name keys as ``config.<key>``; the entry points say ``--config.<key>``.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import ml_collections

from p2p_jax import layers, models, recipe, train

DIRECTIONS = ("AtoB", "BtoA")
DATASET_MODES = ("aligned", "colorization")
PREPROCESS_MODES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
NORMS = ("batch", "instance", "none")
DTYPES = ("float32", "bfloat16", "float16")
POSITIVE_INTS = ("input_nc", "output_nc", "batch_size", "load_size", "crop_size", "log_every_steps", "checkpoint_every_steps",
                 "sample_every_steps", "keep_checkpoints", "num_sample_images", "model.ngf", "model.ndf",
                 "model.num_downs", "model.n_blocks")
# Keys that may differ between a run and its resumption: they change neither
# the state's layout nor the training trajectory up to the resumed step.
RESUMABLE_KEYS = frozenset({
    "data_dir", "verify_checksums", "cache", "skip_bad_files", "eval_split", "num_epochs", "num_train_steps",
    "log_every_steps", "checkpoint_every_steps", "sample_every_steps", "eval_every_steps", "keep_checkpoints",
    "num_sample_images", "model.conv_impl", "model.upconv_impl",
})
# How configs saved by older versions map onto today's keys.
_RENAMED_KEYS = {"optim.b1": "optim.kwargs.b1", "optim.b2": "optim.kwargs.b2"}
_REMOVED_KEYS = frozenset({"steps_per_epoch"})  # Derived from the data, no longer stored.
# Keys added since, with the value that keeps how an older run trained (where
# today's default would change it); other missing keys take today's default.
_VALUES_BEFORE_THE_KEY = {"optim.lr_update": "end_of_epoch"}


def default_config() -> ml_collections.ConfigDict:
  """The paper's and the reference's pix2pix settings (facades, 256 px, batch 1)."""
  config = ml_collections.ConfigDict()
  # Data: "pix2pix/<name>" (TFDS), a folder in the pix2pix layout, or "synthetic".
  config.dataset = "pix2pix/facades"
  config.data_dir = ""  # TFDS data dir and synthetic cache; "" = the library default.
  config.verify_checksums = True  # Check a paper dataset's archive before building it.
  config.train_split = "train"
  config.eval_split = "test"
  config.direction = "AtoB"
  # Channels of the model's input and target (after direction): 1 grey, 3 RGB, or
  # any N, from files of exactly N channels (e.g. TIFF samples or pages).
  config.input_nc = 3
  config.output_nc = 3
  # aligned: A and B pairs. colorization: the reference's, from plain colour
  # photos (<split>/*.jpg): L in (input_nc=1), ab out (output_nc=2), CIE Lab.
  config.dataset_mode = "aligned"
  config.preprocess = "resize_and_crop"  # resize_and_crop | crop | scale_width | none
  config.load_size = 286
  config.crop_size = 256
  config.no_flip = False
  config.cache = False
  config.skip_bad_files = False
  config.batch_size = 1
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  # unet | resnet, or the import path of a Flax module class (or of a function
  # returning a module), e.g. "my_project.nets:AttentionUNet", built with
  # generator_kwargs. Likewise the discriminator: patchgan, or an import path.
  config.model.generator = "unet"
  config.model.generator_kwargs = ml_collections.ConfigDict()
  config.model.discriminator = "patchgan"
  config.model.discriminator_kwargs = ml_collections.ConfigDict()
  # The built-in networks' settings.
  config.model.num_downs = 8  # 8: unet_256, 7: unet_128
  config.model.n_blocks = 9  # resnet_9blocks | resnet_6blocks
  config.model.ngf = 64
  config.model.ndf = 64
  config.model.n_layers_d = 3  # 0: PixelGAN, 1: 16x16, 3: 70x70, 5: 286x286 ImageGAN
  config.model.norm = "batch"  # batch | instance | none
  config.model.use_dropout = True
  # pmap only: batch norm over the whole batch instead of each device's share.
  # experiments.train (jit over a device mesh) always normalises over the global batch.
  config.model.sync_batch_stats = False
  config.model.dtype = "float32"  # compute dtype; parameters and losses stay float32
  # Formulations (same parameters; "auto" picks per backend as measured in
  # BENCHMARKS.md): convs auto | xla | matmul, transposed convs auto | conv_transpose | matmul.
  config.model.conv_impl = "auto"
  config.model.upconv_impl = "auto"

  config.loss = ml_collections.ConfigDict()
  config.loss.gan_mode = "vanilla"  # vanilla | lsgan | wgangp | hinge, or an import path (module:function)
  config.loss.lambda_l1 = 100.0
  # Further generator terms, each <name> = {"fn": "module:function", "weight": w}:
  # fn(losses.LossInputs) -> scalar, reported as the metric g_<name>.
  config.loss.terms = ml_collections.ConfigDict()

  config.optim = ml_collections.ConfigDict()
  # An optax function ("adam", "adamw", ...) or an import path, called as
  # optimizer(learning_rate=<schedule>, **kwargs); one each for G and D.
  config.optim.optimizer = "adam"
  config.optim.kwargs = ml_collections.ConfigDict({"b1": 0.5, "b2": 0.999})
  config.optim.lr = 2e-4
  # linear (the reference's: constant, then linear decay to 0) | constant, or an
  # import path of fn(optim_config, steps_per_epoch, total_steps) -> optax schedule.
  config.optim.schedule = "linear"
  config.optim.n_epochs = 100  # epochs at the initial rate
  config.optim.n_epochs_decay = 100  # epochs of linear decay to zero
  # When the linear schedule steps: at the start of every epoch, as the
  # reference's train.py does now (the last epoch runs at 0), or at the end, as
  # it did before 2020 (and p2p_jax before it followed the reference).
  config.optim.lr_update = "start_of_epoch"  # start_of_epoch | end_of_epoch

  config.num_epochs = config.optim.get_ref("n_epochs") + config.optim.get_ref("n_epochs_decay")
  config.num_train_steps = -1  # > 0 overrides num_epochs

  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.sample_every_steps = 1000
  # 0: off. N: every N steps (and at the end) the eval split's L1, PSNR, SSIM,
  # and FID, KID and LPIPS where their weights are installed, to TensorBoard
  # as eval/<metric>. Single-process runs only.
  config.eval_every_steps = 0
  config.keep_checkpoints = 3
  config.num_sample_images = 4
  return config


def flatten(config) -> Dict[str, Any]:
  """Every value of ``config`` (a ConfigDict or a dict) under its dotted key, e.g. ``{"model.ngf": 64}``."""
  def walk(tree, prefix):
    flat = {}
    for key, value in tree.items():
      if isinstance(value, Mapping) and value:
        flat.update(walk(value, f"{prefix}{key}."))
      else:
        flat[f"{prefix}{key}"] = value
    return flat
  return walk(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config, "")


def outside_import_paths(config: ml_collections.ConfigDict) -> Tuple[str, ...]:
  """The import paths in ``config.model``, ``.loss`` and ``.optim`` that name code outside p2p_jax."""
  values = [value for section in ("model", "loss", "optim") for value in flatten(config[section]).values()]
  return tuple(v for v in values if isinstance(v, str) and ":" in v and v.split(":")[0].split(".")[0] != "p2p_jax")


def _unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
  tree: Dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split(".")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def upgrade(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved by this or an older p2p_jax, in today's keys.

  Renamed keys move, keys no longer used go, and keys the saved config lacks
  take the value that keeps how the older version trained (today's default,
  unless ``_VALUES_BEFORE_THE_KEY`` says otherwise). Keys that p2p_jax does
  not know (a user's own) are kept.
  """
  flat = {key: value for key, value in flatten(saved).items() if key not in _REMOVED_KEYS}
  for old, new in _RENAMED_KEYS.items():
    if old in flat:
      flat[new] = flat.pop(old)
  merged = flatten(default_config())
  merged.update({key: value for key, value in _VALUES_BEFORE_THE_KEY.items() if key not in flat})
  merged.update(flat)
  return ml_collections.ConfigDict(_unflatten(merged))


def check_compatible(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict,
                     where: str) -> None:
  """Raises a ValueError naming every key outside RESUMABLE_KEYS that differs."""
  missing = "<absent>"
  old, new = flatten(saved), flatten(config)
  differing = sorted(key for key in old.keys() | new.keys()
                     if key not in RESUMABLE_KEYS and old.get(key, missing) != new.get(key, missing))
  if differing:
    changes = "; ".join(f"config.{key}: {old.get(key, missing)!r} in the checkpoint, "
                        f"{new.get(key, missing)!r} now" for key in differing)
    raise ValueError(
        f"{where} holds a checkpoint of a different run ({changes}). It was left untouched: "
        "use another --workdir, or the checkpoint's values for these keys to resume it.")


def _check_values(config: ml_collections.ConfigDict) -> None:
  flat = flatten(config)
  for key in POSITIVE_INTS:
    value = flat[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"config.{key} must be a positive int, got {value!r}")
  for key in ("num_epochs", "num_train_steps"):
    if isinstance(flat[key], bool) or not isinstance(flat[key], int):
      raise ValueError(f"config.{key} must be an int, got {flat[key]!r}")
  if config.num_train_steps <= 0 and config.num_epochs < 1:
    raise ValueError(f"config.num_epochs={config.num_epochs} with config.num_train_steps="
                     f"{config.num_train_steps}: set one of them to a positive number.")
  for key, choices in (("direction", DIRECTIONS), ("dataset_mode", DATASET_MODES), ("preprocess", PREPROCESS_MODES), ("model.norm", NORMS),
                       ("model.dtype", DTYPES), ("model.conv_impl", layers.CONV_IMPLS),
                       ("model.upconv_impl", layers.UPCONV_IMPLS), ("optim.lr_update", recipe.LR_UPDATES)):
    if flat[key] not in choices:
      raise ValueError(f"config.{key} must be one of {tuple(choices)}, got {flat[key]!r}")
  if config.dataset_mode == "colorization" and (config.input_nc, config.output_nc, config.direction) != (1, 2, "AtoB"):
    raise ValueError(f"config.dataset_mode='colorization' translates L to ab: it needs config.input_nc=1, "
                     f"config.output_nc=2 and config.direction='AtoB', got {config.input_nc}, "
                     f"{config.output_nc} and {config.direction!r}.")
  if not 0 <= config.model.n_layers_d <= 8:
    raise ValueError(f"config.model.n_layers_d must be in [0, 8], got {config.model.n_layers_d!r}")
  if config.preprocess in ("resize_and_crop", "scale_width_and_crop") and config.crop_size > config.load_size:
    raise ValueError(f"config.crop_size={config.crop_size} is larger than config.load_size="
                     f"{config.load_size}: a random crop must fit in the resized image.")
  for name, term in config.loss.terms.items():
    if not hasattr(term, "keys") or set(term.keys()) != {"fn", "weight"}:
      raise ValueError(f"config.loss.terms.{name} must be a dict with keys 'fn' (an import path) and "
                       f"'weight', got {term.to_dict() if hasattr(term, 'to_dict') else term!r}")
    if name == "l1":
      raise ValueError("config.loss.terms.l1: the L1 term is built in; set config.loss.lambda_l1 instead.")


def _check_image_size(config: ml_collections.ConfigDict) -> None:
  """The built-in networks' constraints on crop_size, in the config's terms."""
  model, size = config.model, config.crop_size
  if model.generator == "unet" and size % 2 ** model.num_downs:
    raise ValueError(
        f"config.crop_size={size} cannot be halved {model.num_downs} times down to 1x1 by the U-Net "
        f"(config.model.num_downs={model.num_downs}): use a multiple of {2 ** model.num_downs}, "
        f"or num_downs=7 for 128 px.")
  if model.generator == "resnet" and size % 4:
    raise ValueError(f"config.crop_size={size} must be a multiple of 4 for the ResNet generator.")
  if model.discriminator == "patchgan" and models.patch_output_size(model.n_layers_d, size) < 1:
    raise ValueError(f"config.crop_size={size} is too small for a discriminator with "
                     f"config.model.n_layers_d={model.n_layers_d}: it would output no logits.")


def check_batch_size(batch_size: int, num_devices: int, num_processes: int) -> None:
  """The global batch must split evenly over the devices (and so over the processes)."""
  if batch_size < 1 or batch_size % num_devices or num_devices % num_processes:
    raise ValueError(
        f"config.batch_size={batch_size} must be a positive multiple of the number of devices, "
        f"{num_devices} ({num_processes} process(es) x {num_devices // num_processes} local "
        "device(s)): it is the global batch size, and every device takes an equal share.")


def image_shapes(config: ml_collections.ConfigDict) -> Dict[str, jax.ShapeDtypeStruct]:
  """The shapes of one training example, ``{"A": source, "B": target}``, for ``train.create_train_state``."""
  size = config.crop_size
  return {name: jax.ShapeDtypeStruct((size, size, channels), "float32")
          for name, channels in (("A", config.input_nc), ("B", config.output_nc))}


def _check_eval_every_steps(every: int, num_processes: int) -> None:
  if not isinstance(every, int) or isinstance(every, bool) or every < 0:
    raise ValueError(f"config.eval_every_steps={every!r}: must be 0 (off) or a positive number of steps.")
  if every and num_processes > 1:
    raise ValueError(f"config.eval_every_steps={every}: evaluation during training runs in one process, "
                     f"not {num_processes}; set it to 0 and evaluate the checkpoints with "
                     "`python -m experiments.evaluate --all_checkpoints`.")


def check(config: ml_collections.ConfigDict, *, num_devices: int = 1, num_processes: int = 1,
          pix2pix: Optional[recipe.Pix2Pix] = None) -> recipe.Pix2Pix:
  """Raises a ValueError naming the first key (and value) a run of ``config`` cannot use.

  Checks every value, the batch size against the devices, and that the
  networks take the images the step gives them (from shapes, nothing is
  computed). Reads no data and writes nothing. ``pix2pix`` checks networks
  given as objects instead of those the config names. Returns the
  ``Pix2Pix`` it checked (built from the config unless given; its schedule
  then assumes one step per epoch).
  """
  _check_values(config)
  check_batch_size(config.batch_size, num_devices, num_processes)
  _check_eval_every_steps(config.eval_every_steps, num_processes)
  if pix2pix is not None:  # A NetworkError names the network given.
    jax.eval_shape(lambda key: train.create_train_state(key, pix2pix, image_shapes(config)), jax.random.key(0))
    return pix2pix
  _check_image_size(config)
  pix2pix = recipe.Pix2Pix.from_config(config, steps_per_epoch=1)
  try:
    jax.eval_shape(lambda key: train.create_train_state(key, pix2pix, image_shapes(config)), jax.random.key(0))
  except train.NetworkError as error:
    raise ValueError(f"config.model.{error.role}={config.model[error.role]!r}: {error}") from None
  return pix2pix

