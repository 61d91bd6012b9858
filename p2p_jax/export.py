"""A trained generator outside p2p_jax: loaded without its training state, or exported.

``load_generator(workdir)`` is a callable that translates NumPy arrays.
``export_generator`` writes the generator as ONNX (``jax2onnx``), a TF
SavedModel (``jax2tf``, with a ``serving_default`` signature) or serialized
StableHLO (``jax.export``; reload with ``jax.export.deserialize``). The
exported graph takes ``images`` and returns ``translated``, each image on its
own, with what a deployment needs inside it: uint8 in [0, 255] or float32 in
[-1, 1], NHWC or NCHW, a dynamic batch, and (SavedModel, StableHLO) any height
and width that are multiples of ``size_multiple``. Built-in networks are
exported with XLA's own convolutions, whatever ``auto`` trains with here: every
runtime has those. The model's metadata (ONNX ``metadata_props``, the
SavedModel's ``metadata`` variable, ``<output>.json`` beside StableHLO) states
the layout, dtype, value range and sizes.
"""

import importlib
import json
import logging as std_logging
import pathlib
from typing import Any, Dict, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from p2p_jax import checkpoint, configuration, recipe, train

FORMATS = ("onnx", "saved_model", "stablehlo")
LAYOUTS = ("NHWC", "NCHW")
DTYPES = ("float32", "uint8")
ONNX_OPSET = 21  # What the ONNX Runtime releases of the last two years all run.
_EXTRA = {"onnx": "jax2onnx and onnxruntime", "saved_model": "tensorflow"}


class Generator:
  """A run's generator and its variables: ``generator(images, seed=0)`` translates.

  ``images``: NHWC float32 in [-1, 1], height and width multiples of
  ``size_multiple``. In ``"paper"`` mode image ``i`` of the batch draws its
  dropout mask from ``fold_in(key(seed), i)``, as ``experiments.translate``
  does for a batch that starts the list.
  """

  def __init__(self, module, variables, *, mode: str, step: int, channels: int, size_multiple: int):
    if mode not in train.GENERATE_MODES:
      raise ValueError(f"mode={mode!r}: must be one of {train.GENERATE_MODES}.")
    self.module, self.variables, self.mode, self.step = module, variables, mode, step
    self.channels, self.size_multiple = channels, size_multiple
    self._translate = jax.jit(self.translate)

  def translate(self, images: jax.Array, seed) -> jax.Array:
    """The pure function behind ``__call__`` (traceable: what is exported)."""
    state = _GeneratorState(self.variables["params"], self.variables.get("batch_stats", {}))
    if self.mode == "eval":  # Running statistics, no dropout: the whole batch at once is the same.
      return train.generate(state, images, generator=self.module)
    rng = jax.random.key(seed)

    def one(image, index):
      return train.generate(state, image[None], jax.random.fold_in(rng, index), self.mode,
                            generator=self.module)[0]
    return jax.vmap(one)(images, jnp.arange(images.shape[0]))

  def check_images(self, shape, what: str = "images") -> None:
    """A ValueError naming ``shape`` if the generator cannot take it."""
    if len(shape) != 4 or shape[-1] != self.channels:
      raise ValueError(f"{what} of shape {tuple(shape)}: expected (batch, height, width, {self.channels}), "
                       "NHWC.")
    if any(side % self.size_multiple or side == 0 for side in shape[1:3]):
      raise ValueError(f"{what} of shape {tuple(shape)}: height and width must be positive multiples of "
                       f"{self.size_multiple} (what this generator's downsampling needs).")

  def __call__(self, images, seed: int = 0) -> np.ndarray:
    images = np.asarray(images, np.float32)
    self.check_images(images.shape)
    return np.asarray(self._translate(images, seed))


class _GeneratorState:
  """The two fields of a TrainState that ``train.generate`` reads."""

  def __init__(self, g_params, g_batch_stats):
    self.g_params, self.g_batch_stats = g_params, g_batch_stats


def portable_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with the formulations every runtime has: XLA's convolutions, float32."""
  portable = config.copy_and_resolve_references()
  portable.model.conv_impl, portable.model.upconv_impl, portable.model.dtype = "xla", "conv_transpose", "float32"
  return portable


def size_multiple(module, variables, size: int, channels: int) -> int:
  """The smallest power of two whose multiples the generator takes as height and width.

  Found by tracing with symbolic sizes (nothing is computed): a size the
  downsampling cannot halve often enough makes the skip connections' shapes
  disagree.
  """
  multiple = 1
  while multiple < size:
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"b, {multiple}*h, {multiple}*w, {channels}"),
                                jnp.float32)
    try:
      jax.eval_shape(lambda x: module.apply(variables, x, train=False), spec)
      return multiple
    except Exception:  # pylint: disable=broad-except  # Any shape error: try the next multiple.
      multiple *= 2
  return size


def load_generator(workdir, step: Optional[int] = None, *, mode: str = "eval", portable: bool = False,
                   pix2pix: Optional[recipe.Pix2Pix] = None) -> Generator:
  """The generator of the latest checkpoint in ``workdir`` (or of ``step``), checked.

  Keeps only the generator's variables. ``portable`` builds the built-in
  networks with ``portable_config`` (what is exported); ``pix2pix`` gives the
  networks of a run trained with networks given as Python objects.
  """
  if mode not in train.GENERATE_MODES:
    raise ValueError(f"mode={mode!r}: must be one of {train.GENERATE_MODES}.")
  run = checkpoint.load_run(workdir, step, pix2pix=pix2pix)
  module = run.pix2pix.generator
  if portable and pix2pix is None:
    module = recipe.Pix2Pix.from_config(portable_config(run.config), steps_per_epoch=1).generator
  variables = {"params": run.state.g_params, "batch_stats": run.state.g_batch_stats}
  shape = configuration.image_shapes(run.config)["A"].shape
  return Generator(module, variables, mode=mode, step=int(run.state.step), channels=shape[-1],
                   size_multiple=size_multiple(module, variables, shape[0], shape[-1]))


def _with_io(generator: Generator, dtype: str, layout: str):
  """``images[, seed] -> translated``: the generator with the chosen pre- and post-processing."""

  def translate(images, seed):
    x = jnp.transpose(images, (0, 2, 3, 1)) if layout == "NCHW" else images
    x = x.astype(jnp.float32) / 127.5 - 1.0 if dtype == "uint8" else x
    y = generator.translate(x, seed)
    y = jnp.round((jnp.clip(y, -1.0, 1.0) + 1.0) * 127.5).astype(jnp.uint8) if dtype == "uint8" else y
    return jnp.transpose(y, (0, 3, 1, 2)) if layout == "NCHW" else y

  if generator.mode == "paper":
    return translate
  return lambda images: translate(images, 0)


def _image_dims(layout: str, channels: int, height, width):
  return (height, width, channels) if layout == "NHWC" else (channels, height, width)


def metadata(generator: Generator, *, dtype: str, layout: str, height: Optional[int],
             width: Optional[int]) -> Dict[str, Any]:
  """What a deployment must know about the exported model's input and output."""
  return {
      "producer": "p2p_jax", "step": generator.step, "mode": generator.mode,
      "input": "images", "output": "translated", "layout": layout, "dtype": dtype,
      "value_range": [0, 255] if dtype == "uint8" else [-1.0, 1.0],
      "channels": generator.channels, "height": height, "width": width,
      "size_multiple": generator.size_multiple,
      "inputs": ["images", "seed"] if generator.mode == "paper" else ["images"],
  }


def _require(module: str, fmt: str):
  try:
    return importlib.import_module(module)
  except ImportError:
    raise ImportError(f"fmt={fmt!r} needs {_EXTRA[fmt]}, which are not installed: "
                      "pip install 'p2p_jax[export]'.") from None


def _symbolic_shape(generator: Generator, layout: str, height: Optional[int], width: Optional[int]) -> str:
  m = generator.size_multiple
  dims = _image_dims(layout, generator.channels, height or f"{m}*h", width or f"{m}*w")
  return "(" + ", ".join(map(str, ("b", *dims))) + ")"


def _export_onnx(generator: Generator, fn, output: pathlib.Path, info: Dict[str, Any]) -> None:
  jax2onnx, onnx = _require("jax2onnx", "onnx"), _require("onnx", "onnx")
  for name in ("jax2onnx", "onnx_ir"):  # Their progress lines, logged at INFO, say nothing to a user.
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  shape = jax.export.symbolic_shape(_symbolic_shape(generator, info["layout"], info["height"], info["width"]))
  model = jax2onnx.to_onnx(fn, inputs=[jax.ShapeDtypeStruct(shape, info["dtype"])], model_name="p2p_jax_generator",
                           opset=ONNX_OPSET, input_names=["images"], output_names=["translated"])
  onnx.helper.set_model_props(model, {key: json.dumps(value) for key, value in info.items()})
  onnx.save(model, output)


def _export_saved_model(generator: Generator, fn, output: pathlib.Path, info: Dict[str, Any]) -> None:
  tf = _require("tensorflow", "saved_model")
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  layout, m = info["layout"], generator.size_multiple
  paper = generator.mode == "paper"
  converted = jax2tf.convert(fn, with_gradient=False, polymorphic_shapes=[
      _symbolic_shape(generator, layout, info["height"], info["width"]), *(["()"] if paper else [])])
  dims = _image_dims(layout, generator.channels, info["height"], info["width"])
  signature = [tf.TensorSpec((None, *dims), info["dtype"], name="images"),
               *([tf.TensorSpec((), tf.int32, name="seed")] if paper else [])]
  sides = (1, 2) if layout == "NHWC" else (2, 3)

  def serve(images, *seed):
    shape = tf.shape(images)
    for side in sides:  # Said in these words, not in XLA's, when a size does not fit.
      tf.debugging.assert_equal(tf.math.floormod(shape[side], m), 0, message=(
          f"images: height and width must be multiples of {m} (layout {layout})"))
    return {"translated": converted(images, *seed)}

  module = tf.Module()
  module.serve = tf.function(serve, input_signature=signature, autograph=False)
  module.metadata = tf.Variable(json.dumps(info), trainable=False, name="metadata")
  absl_logger = logging.get_absl_logger()
  level = absl_logger.level
  try:
    tf.saved_model.save(module, str(output), signatures={"serving_default": module.serve})
  finally:  # TensorFlow's save sets absl's logger to WARNING: the caller's INFO lines would vanish.
    absl_logger.setLevel(level)


def _export_stablehlo(generator: Generator, fn, output: pathlib.Path, info: Dict[str, Any]) -> None:
  shape = jax.export.symbolic_shape(_symbolic_shape(generator, info["layout"], info["height"], info["width"]))
  specs = [jax.ShapeDtypeStruct(shape, info["dtype"])]
  if generator.mode == "paper":
    specs.append(jax.ShapeDtypeStruct((), jnp.int32))
  exported = jax.export.export(jax.jit(fn))(*specs)
  output.write_bytes(exported.serialize())
  metadata_path(output).write_text(json.dumps(info, indent=2) + "\n")


def metadata_path(stablehlo_path) -> pathlib.Path:
  """Where the metadata of a StableHLO export is written: ``<path>.json``."""
  return pathlib.Path(f"{stablehlo_path}.json")


def load_exported(path, fmt: str):
  """``run(images[, seed]) -> translated`` (NumPy) of a model ``export_generator`` wrote, in its own runtime.

  ONNX Runtime, TensorFlow or ``jax.export``: what a deployment would run.
  """
  path = pathlib.Path(path)
  if fmt == "onnx":
    session = _require("onnxruntime", "onnx").InferenceSession(str(path))
    return lambda images: session.run(None, {"images": images})[0]
  if fmt == "saved_model":
    tf = _require("tensorflow", "saved_model")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(images, *seed):
      extra = {"seed": tf.constant(seed[0], tf.int32)} if seed else {}
      return serve(images=tf.constant(images), **extra)["translated"].numpy()
    return run
  if fmt == "stablehlo":
    exported = jax.export.deserialize(path.read_bytes())
    return lambda images, *seed: np.asarray(exported.call(images, *(np.int32(s) for s in seed)))
  raise ValueError(f"fmt={fmt!r}: must be one of {FORMATS}.")


_EXPORTERS = {"onnx": _export_onnx, "saved_model": _export_saved_model, "stablehlo": _export_stablehlo}


def _check_output(output: pathlib.Path, fmt: str) -> None:
  if fmt == "saved_model" and output.is_file():
    raise ValueError(f"output={output} is a file: a SavedModel is a folder.")
  if fmt != "saved_model" and output.is_dir():
    raise ValueError(f"output={output} is a folder: give the path of the {fmt} file to write.")


def export_generator(workdir, output, fmt: str, *, step: Optional[int] = None, mode: str = "eval",
                     dtype: str = "float32", layout: str = "NHWC", size: Optional[int] = None,
                     pix2pix: Optional[recipe.Pix2Pix] = None) -> Dict[str, Any]:
  """Writes the generator of ``workdir``'s checkpoint to ``output`` in format ``fmt``; returns its metadata.

  ``size``: the height and width the model takes, fixed; by default the
  training crop for ONNX (whose converter needs fixed sizes) and any multiple
  of ``size_multiple`` for the others.
  """
  for name, value, allowed in (("fmt", fmt, FORMATS), ("mode", mode, train.GENERATE_MODES),
                               ("dtype", dtype, DTYPES), ("layout", layout, LAYOUTS)):
    if value not in allowed:
      raise ValueError(f"{name}={value!r}: must be one of {allowed}.")
  if fmt == "onnx" and mode == "paper":
    raise ValueError("fmt='onnx' with mode='paper': jax2onnx turns dropout into ONNX's Dropout, whose masks "
                     "ONNX Runtime draws itself (no seed, not translate's masks); export mode='paper' as "
                     "saved_model or stablehlo.")
  output = pathlib.Path(output).expanduser()
  _check_output(output, fmt)
  if fmt != "stablehlo":
    _require({"onnx": "jax2onnx", "saved_model": "tensorflow"}[fmt], fmt)
  generator = load_generator(workdir, step, mode=mode, portable=True, pix2pix=pix2pix)
  if size is None and fmt == "onnx":
    size = checkpoint.load_config(workdir, step).crop_size
  if size is not None and (size <= 0 or size % generator.size_multiple):
    raise ValueError(f"size={size}: this generator takes heights and widths that are positive multiples of "
                     f"{generator.size_multiple} (what its downsampling needs).")
  info = metadata(generator, dtype=dtype, layout=layout, height=size, width=size)
  output.parent.mkdir(parents=True, exist_ok=True)
  _EXPORTERS[fmt](generator, _with_io(generator, dtype, layout), output, info)
  return info
