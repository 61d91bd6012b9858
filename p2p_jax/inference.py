"""Using a trained generator: translating images, and evaluating a checkpoint on a split.

``make_translate_fn`` and ``evaluate`` work on a state in memory (the training
loop's sample sheets use the former); ``translate_paths`` and
``evaluate_checkpoint`` are what ``experiments.translate`` and
``experiments.evaluate`` run on a workdir. Errors name the arguments
(``input_path=...``); the entry points say them as flags.
"""

import json
import pathlib
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image

from p2p_jax import checkpoint, images, input_pipeline, metrics, recipe, summaries, train

EVAL_DIR = "eval"
_MAX_NAMED = 5


def make_translate_fn(generator, mode: str):
  """``(state, images, rng, indices) -> generated``, each image translated on its own.

  In ``"paper"`` mode the generator normalises with the statistics of the
  image itself and draws its own dropout mask, exactly what the reference's
  test.py does with its batch size of 1. Image ``i`` of the batch draws its
  mask from ``fold_in(rng, indices[i])``: its index in the split (or the
  list of files), so the batch size changes nothing.
  """
  if mode not in train.GENERATE_MODES:
    raise ValueError(f"mode must be one of {train.GENERATE_MODES}, got {mode!r}")

  def translate(state, images, rng, indices):
    def one(image, index):
      return train.generate(state, image[None], jax.random.fold_in(rng, index), mode, generator=generator)[0]
    return jax.vmap(one)(images, indices)

  return translate


def evaluate(state: train.TrainState, generator, config: ml_collections.ConfigDict, *,
             split: Optional[str] = None, mode: str = "eval", batch_size: Optional[int] = None,
             seed: int = 0) -> Tuple[Dict[str, float], np.ndarray]:
  """Mean L1, PSNR and SSIM over a split, and a sample sheet of its first images.

  Single-process; ``seed`` draws the dropout masks in ``"paper"`` mode.
  """
  translate = jax.jit(make_translate_fn(generator, mode))
  dataset = input_pipeline.make_eval_dataset(config, batch_size=batch_size, split=split)
  totals, count, sheet_parts = {}, 0, []
  for batch in dataset.as_numpy_iterator():
    generated = translate(state, batch["A"], jax.random.key(seed), count + np.arange(len(batch["A"])))
    for name, values in jax.device_get(metrics.image_metrics(generated, batch["B"])).items():
      totals[name] = totals.get(name, 0.0) + float(np.sum(values))
    count += len(batch["A"])
    if sum(len(p[0]) for p in sheet_parts) < config.num_sample_images:
      sheet_parts.append((batch["A"], np.asarray(generated), batch["B"]))
  if not count:
    raise ValueError(f"The eval split {split or config.eval_split!r} of {config.dataset!r} is empty.")
  columns = [np.concatenate(c)[:config.num_sample_images] for c in zip(*sheet_parts)]
  means = {name: total / count for name, total in totals.items()}
  means["num_images"] = count
  return means, summaries.sample_sheet(*columns)


def list_images(path) -> List[pathlib.Path]:
  """``path`` itself, or the images in folder ``path``.

  Each is decoded once here, so every unreadable input is named before the
  checkpoint is loaded or anything is written.
  """
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    paths = images.image_files(path)
    if not paths:
      raise ValueError(f"input_path={path}: no {'/'.join(images.IMAGE_EXTENSIONS)} files in this folder.")
  elif path.is_file():
    paths = [path]
  else:
    raise FileNotFoundError(f"input_path={path}: no such file or folder.")
  errors = [f"Cannot read image {p}: {error}" for p, error in images.decode_errors(paths).items()]
  if errors:
    more = f"; and {len(errors) - _MAX_NAMED} more" if len(errors) > _MAX_NAMED else ""
    raise ValueError(f"input_path={path}: {len(errors)} of {len(paths)} images do not decode. "
                     f"{'; '.join(errors[:_MAX_NAMED])}{more}")
  return paths


def _to_model_input(image: Image.Image, size: int) -> np.ndarray:
  resized = image.resize((size, size), Image.Resampling.BICUBIC)
  return np.asarray(resized, np.float32) / 127.5 - 1.0


def _to_image(array: np.ndarray, size) -> Image.Image:
  pixels = np.round((np.clip(array, -1, 1) + 1) * 127.5).astype(np.uint8)
  return Image.fromarray(pixels).resize(size, Image.Resampling.BICUBIC)


def _check_batch_size(batch_size: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be positive.")


def translate_paths(workdir, input_path, output_dir, *, step: Optional[int] = None,
                    mode: str = "eval", batch_size: int = 8, seed: int = 0,
                    pix2pix: Optional[recipe.Pix2Pix] = None) -> List[pathlib.Path]:
  """Translates the image(s) at ``input_path`` into ``output_dir``; returns the written paths.

  Each image is resized to the model's size, translated in the direction the
  run was trained in, and the result resized back and saved as
  ``output_dir/<name>.png``. ``pix2pix`` gives the networks of a run trained
  with networks given as Python objects.
  """
  _check_batch_size(batch_size)
  output_dir = pathlib.Path(output_dir).expanduser()
  if output_dir.exists() and not output_dir.is_dir():
    raise ValueError(f"output_dir={output_dir} is a file: give a folder for the translated images.")
  paths = list_images(input_path)
  if output_dir.resolve() in {p.parent.resolve() for p in paths}:
    raise ValueError(f"output_dir={output_dir} is the input folder: choose another folder, so no "
                     "input is overwritten.")
  stems = [p.stem for p in paths]
  clashes = sorted({s for s in stems if stems.count(s) > 1})
  if clashes:
    raise ValueError(f"input_path={input_path}: several files would be written as "
                     f"{output_dir / (clashes[0] + '.png')}; rename them apart.")
  run = checkpoint.load_run(workdir, step, pix2pix=pix2pix)
  logging.info("Translating %d image(s) with the step %d generator (config.direction=%s, "
               "mode=%s).", len(paths), int(run.state.step), run.config.direction, mode)
  translate = jax.jit(make_translate_fn(run.pix2pix.generator, mode))
  output_dir.mkdir(parents=True, exist_ok=True)
  size, written = run.config.crop_size, []
  for start in range(0, len(paths), batch_size):
    originals = [images.read_rgb(p) for p in paths[start:start + batch_size]]
    batch = np.zeros((batch_size, size, size, 3), np.float32)  # one shape: one compilation
    batch[:len(originals)] = [_to_model_input(image, size) for image in originals]
    generated = np.asarray(translate(run.state, batch, jax.random.key(seed), start + np.arange(batch_size)))
    for path, image, result in zip(paths[start:], originals, generated):
      target = output_dir / f"{path.stem}.png"
      _to_image(result, image.size).save(target)
      written.append(target)
  return written


def evaluate_checkpoint(workdir, *, step: Optional[int] = None, split: Optional[str] = None,
                        mode: str = "eval", batch_size: int = 8, data_dir: Optional[str] = None,
                        pix2pix: Optional[recipe.Pix2Pix] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` on a split and writes the results; returns them.

  Writes ``<workdir>/eval/<split>_<mode>_step<N>.json``, TensorBoard scalars
  and the sample sheet in ``<workdir>/eval``, and the sheet as a PNG (with an
  index.html) in ``<workdir>/eval/<split>_<mode>/``. ``workdir`` may be a URL
  (``gs://...``), as in training.
  """
  _check_batch_size(batch_size)
  run = checkpoint.load_run(workdir, step, pix2pix=pix2pix)
  config = run.config
  if data_dir is not None:
    config.data_dir = data_dir
  step, split = int(run.state.step), split or config.eval_split
  means, sheet = evaluate(run.state, run.pix2pix.generator, config, split=split, mode=mode,
                          batch_size=batch_size)
  results = {"step": step, "split": split, "mode": mode, "dataset": config.dataset, **means}

  out = checkpoint.workdir_path(workdir) / EVAL_DIR
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{split}_{mode}_step{step}.json").write_text(json.dumps(results, indent=2) + "\n")
  summaries.write_samples(out / f"{split}_{mode}", step, sheet)
  writer = summaries.create_writer(out)
  writer.write_scalars(step, {f"{split}_{mode}/{name}": means[name]
                              for name in ("l1", "psnr", "ssim")})
  writer.write_images(step, {f"{split}_{mode}/samples": sheet[None]})
  writer.close()
  return results
