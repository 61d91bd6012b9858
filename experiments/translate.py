r"""Translates images with a trained generator.

  python -m experiments.translate --workdir DIR --input PATH --output OUT_DIR

PATH is one image or a folder of them (single images of the run's source
domain, not A|B pairs). Each is resized to the model's size, translated and the
result resized back to the input's size, saved as OUT_DIR/<name>.png.
"""

import pathlib
import sys
from typing import List, Optional

from absl import app, flags, logging
import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from p2p_jax import checkpoint, input_pipeline, train, trainer

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir (its checkpoints are used).")
flags.DEFINE_string("input", None, "An image, or a folder of images.")
flags.DEFINE_string("output", None, "Folder for the translated images (created if needed).")
flags.DEFINE_integer("step", None, "Checkpoint step to use; the latest by default.")
flags.DEFINE_enum("mode", "eval", train.GENERATE_MODES,
                  "eval: running batch statistics, no dropout. paper: as the paper at test time, "
                  "each image normalised with its own statistics and dropout on.")
flags.DEFINE_integer("batch_size", 8, "Images per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed of the dropout masks in --mode=paper.")
flags.mark_flags_as_required(["workdir", "input", "output"])


def list_images(path) -> List[pathlib.Path]:
  """``path`` itself, or the images in folder ``path``; each header is read once."""
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    paths = sorted(p for p in path.iterdir()
                   if p.is_file() and p.suffix.lower() in input_pipeline.IMAGE_EXTENSIONS)
    if not paths:
      raise ValueError(f"--input {path}: no {'/'.join(input_pipeline.IMAGE_EXTENSIONS)} files "
                       "in this folder.")
  elif path.is_file():
    paths = [path]
  else:
    raise FileNotFoundError(f"--input {path}: no such file or folder.")
  for p in paths:
    _open(p).close()
  return paths


def _open(path: pathlib.Path) -> Image.Image:
  try:
    return Image.open(path)
  except (UnidentifiedImageError, OSError) as error:
    raise ValueError(f"Cannot read image {path}: {error}") from None


def _read_rgb(path: pathlib.Path) -> Image.Image:
  with _open(path) as image:
    try:
      return image.convert("RGB")
    except OSError as error:  # e.g. a truncated file: the header was fine.
      raise ValueError(f"Cannot read image {path}: {error}") from None


def _to_model_input(image: Image.Image, size: int) -> np.ndarray:
  resized = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.float32) / 127.5 - 1.0


def _to_image(array: np.ndarray, size) -> Image.Image:
  pixels = np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8)
  return Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)


def translate_paths(workdir, input_path, output_dir, *, step: Optional[int] = None,
                    mode: str = "eval", batch_size: int = 8, seed: int = 0) -> List[pathlib.Path]:
  """Translates the image(s) at ``input_path`` into ``output_dir``; returns the written paths."""
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  paths = list_images(input_path)
  output_dir = pathlib.Path(output_dir).expanduser()
  if output_dir.resolve() in {p.parent.resolve() for p in paths}:
    raise ValueError(f"--output {output_dir} is the input folder: choose another folder, so no "
                     "input is overwritten.")
  stems = [p.stem for p in paths]
  clashes = sorted({s for s in stems if stems.count(s) > 1})
  if clashes:
    raise ValueError(f"--input {input_path}: several files would be written as "
                     f"{output_dir / (clashes[0] + '.png')}; rename them apart.")
  config = checkpoint.load_config(workdir, step)
  state = checkpoint.load_state(workdir, step)
  logging.info("Translating %d image(s) with the step %d generator (config.direction=%s, "
               "mode=%s).", len(paths), int(state.step), config.direction, mode)
  translate = jax.jit(trainer.make_translate_fn(config, mode))
  output_dir.mkdir(parents=True, exist_ok=True)
  size, written = config.crop_size, []
  for start in range(0, len(paths), batch_size):
    images = [_read_rgb(p) for p in paths[start:start + batch_size]]
    batch = np.zeros((batch_size, size, size, 3), np.float32)  # one shape: one compilation
    batch[:len(images)] = [_to_model_input(image, size) for image in images]
    key = jax.random.fold_in(jax.random.key(seed), start)
    generated = np.asarray(translate(state, batch, key))
    for path, image, result in zip(paths[start:], images, generated):
      target = output_dir / f"{path.stem}.png"
      _to_image(result, image.size).save(target)
      written.append(target)
  return written


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  checkpoint.quiet_orbax_logs()
  try:
    written = translate_paths(FLAGS.workdir, FLAGS.input, FLAGS.output, step=FLAGS.step,
                              mode=FLAGS.mode, batch_size=FLAGS.batch_size, seed=FLAGS.seed)
  except (ValueError, FileNotFoundError) as error:
    sys.exit(f"error: {error}")
  logging.info("Wrote %d image(s) to %s.", len(written), FLAGS.output)


if __name__ == "__main__":
  app.run(main)
