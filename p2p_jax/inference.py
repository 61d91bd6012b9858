"""Using a trained run: translating image files, and evaluating a checkpoint on a split.

The library side of ``experiments.translate`` and ``experiments.evaluate``
(their absl flags cannot share one process), so tests and tools call it
directly. Errors name the entry points' flags, which is what users type.
"""

import json
import pathlib
from typing import Any, Dict, List, Optional

from absl import logging
import jax
import numpy as np
from PIL import Image, UnidentifiedImageError

from p2p_jax import checkpoint, input_pipeline, summaries, trainer

EVAL_DIR = "eval"
_MAX_NAMED = 5


def read_rgb(path) -> Image.Image:
  """The image at ``path`` as 8-bit RGB; a ValueError names a file that does not decode."""
  try:
    with Image.open(path) as image:
      if image.mode.startswith("I;16"):  # 16-bit grey (e.g. depth maps): scale, do not clip.
        grey = np.round(np.asarray(image, np.float32) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
      return image.convert("RGB")
  except (UnidentifiedImageError, OSError, SyntaxError) as error:  # PIL's errors for bad files.
    raise ValueError(f"Cannot read image {path}: {error}") from None


def list_images(path) -> List[pathlib.Path]:
  """``path`` itself, or the images in folder ``path``.

  Each is decoded once here, so every unreadable input is named before the
  checkpoint is loaded or anything is written.
  """
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
  errors = []
  for p in paths:
    try:
      read_rgb(p).close()
    except ValueError as error:
      errors.append(str(error))
  if errors:
    more = f"; and {len(errors) - _MAX_NAMED} more" if len(errors) > _MAX_NAMED else ""
    raise ValueError(f"--input {path}: {len(errors)} of {len(paths)} images do not decode. "
                     f"{'; '.join(errors[:_MAX_NAMED])}{more}")
  return paths


def _to_model_input(image: Image.Image, size: int) -> np.ndarray:
  resized = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.float32) / 127.5 - 1.0


def _to_image(array: np.ndarray, size) -> Image.Image:
  pixels = np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8)
  return Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)


def translate_paths(workdir, input_path, output_dir, *, step: Optional[int] = None,
                    mode: str = "eval", batch_size: int = 8, seed: int = 0) -> List[pathlib.Path]:
  """Translates the image(s) at ``input_path`` into ``output_dir``; returns the written paths.

  Each image is resized to the model's size, translated in the direction the
  run was trained in, and the result resized back and saved as
  ``output_dir/<name>.png``.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  output_dir = pathlib.Path(output_dir).expanduser()
  if output_dir.exists() and not output_dir.is_dir():
    raise ValueError(f"--output {output_dir} is a file: give a folder for the translated images.")
  paths = list_images(input_path)
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
    images = [read_rgb(p) for p in paths[start:start + batch_size]]
    batch = np.zeros((batch_size, size, size, 3), np.float32)  # one shape: one compilation
    batch[:len(images)] = [_to_model_input(image, size) for image in images]
    key = jax.random.fold_in(jax.random.key(seed), start)
    generated = np.asarray(translate(state, batch, key))
    for path, image, result in zip(paths[start:], images, generated):
      target = output_dir / f"{path.stem}.png"
      _to_image(result, image.size).save(target)
      written.append(target)
  return written


def evaluate_checkpoint(workdir, *, step: Optional[int] = None, split: Optional[str] = None,
                        mode: str = "eval", batch_size: int = 8,
                        data_dir: Optional[str] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` on a split and writes the results; returns them.

  Writes ``<workdir>/eval/<split>_<mode>_step<N>.json``, TensorBoard scalars
  and the sample sheet in ``<workdir>/eval``, and the sheet as a PNG (with an
  index.html) in ``<workdir>/eval/<split>_<mode>/``.
  """
  if batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {batch_size}")
  config = checkpoint.load_config(workdir, step)
  if data_dir is not None:
    config.data_dir = data_dir
  state = checkpoint.load_state(workdir, step)
  step, split = int(state.step), split or config.eval_split
  means, sheet = trainer.evaluate(state, config, split=split, mode=mode, batch_size=batch_size)
  results = {"step": step, "split": split, "mode": mode, "dataset": config.dataset, **means}

  out = pathlib.Path(workdir).expanduser() / EVAL_DIR
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{split}_{mode}_step{step}.json").write_text(json.dumps(results, indent=2) + "\n")
  summaries.write_samples(out / f"{split}_{mode}", step, sheet)
  writer = summaries.create_writer(out)
  writer.write_scalars(step, {f"{split}_{mode}/{name}": means[name]
                              for name in ("l1", "psnr", "ssim")})
  writer.write_images(step, {f"{split}_{mode}/samples": sheet[None]})
  writer.close()
  return results
