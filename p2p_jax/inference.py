"""Using a trained generator: translating images, and evaluating a checkpoint on a split.

``make_translate_fn`` and ``evaluate`` work on a state in memory (the training
loop's sample sheets use the former); ``translate_paths`` and
``evaluate_checkpoint`` are what ``experiments.translate`` and
``experiments.evaluate`` run on a workdir. Errors name the arguments
(``input_path=...``); the entry points say them as flags.
"""

import json
import pathlib
import sys
from typing import Any, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf
import tqdm

from p2p_jax import checkpoint, images, input_pipeline, metrics, perceptual, recipe, summaries, train

EVAL_DIR = "eval"
REAL_FEATURES_DIR = "real_features"  # In EVAL_DIR: each split's real Inception features, by what they depend on.
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


def result_names(filenames: List[str]) -> List[str]:
  """The names per-image results are written under: the files' stems, numbered where two clash."""
  stems = [pathlib.PurePath(f).stem for f in filenames]
  if len(set(stems)) == len(stems):
    return stems
  return [f"{i:05d}_{stem}" for i, stem in enumerate(stems)]


def evaluate(state: train.TrainState, generator, config: ml_collections.ConfigDict, *,
             split: Optional[str] = None, mode: str = "eval", batch_size: Optional[int] = None,
             seed: int = 0, scorer: Optional[perceptual.Scorer] = None, results_dir=None,
             source: Optional[input_pipeline.PairSource] = None) -> Tuple[Dict[str, float], np.ndarray]:
  """Mean L1, PSNR and SSIM over a split (and FID, KID, LPIPS with ``scorer``), and a sample sheet.

  Single-process; ``seed`` draws the dropout masks in ``"paper"`` mode.
  ``results_dir``: where to write every image's ``real_A``, ``fake_B`` and
  ``real_B`` with an index.html (``summaries.write_result_images``).
  ``source``, if given, is the split, opened already (its files checked).
  """
  translate = jax.jit(make_translate_fn(generator, mode))
  if source is None:
    source = (input_pipeline.pair_source(config, split) if split else
              input_pipeline.pair_source(config, config.eval_split, named_by="config.eval_split"))
  names = result_names(source.filenames)
  dataset = input_pipeline.make_eval_dataset(config, batch_size=batch_size, source=source)
  totals, count, sheet_parts = {}, 0, []
  computed = ", ".join(["l1", "psnr", "ssim", *(scorer.available if scorer else [])])
  with tqdm.tqdm(total=source.num_examples, desc=f"Evaluating ({computed})", unit="image",
                 disable=not sys.stderr.isatty(), leave=False) as bar:
    for batch in dataset.as_numpy_iterator():
      n = len(batch["A"])
      generated = np.asarray(translate(state, batch["A"], jax.random.key(seed), count + np.arange(n)))
      for name, values in jax.device_get(metrics.image_metrics(generated, batch["B"])).items():
        totals[name] = totals.get(name, 0.0) + float(np.sum(values))
      if scorer is not None:
        scorer.add(generated, batch["B"])
      if results_dir is not None:
        summaries.write_result_images(results_dir, names[count:count + n], batch["A"], generated, batch["B"])
      count += n
      bar.update(n)
      if sum(len(p[0]) for p in sheet_parts) < config.num_sample_images:
        sheet_parts.append((batch["A"], generated, batch["B"]))
  if not count:
    raise ValueError(f"The eval split {split or config.eval_split!r} of {config.dataset!r} is empty.")
  columns = [np.concatenate(c)[:config.num_sample_images] for c in zip(*sheet_parts)]
  means = {name: total / count for name, total in totals.items()}
  if scorer is not None:
    means.update(scorer.results())
  means["num_images"] = count
  if results_dir is not None:
    summaries.write_results_index(results_dir, names)
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
  return Image.fromarray(summaries.to_uint8(array)).resize(size, Image.Resampling.BICUBIC)


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
                        pix2pix: Optional[recipe.Pix2Pix] = None,
                        scorer: Optional[perceptual.Scorer] = None) -> Dict[str, Any]:
  """Evaluates a checkpoint of ``workdir`` on a split and writes the results; returns them.

  L1, PSNR, SSIM, and FID, KID and LPIPS where their weights are installed
  (``scorer``: one made already, e.g. holding the split's real features).
  Writes ``<workdir>/eval/<split>_<mode>_step<N>.json``, TensorBoard scalars
  and the sample sheet in ``<workdir>/eval``, the sheet as a PNG (with an
  index.html) in ``<workdir>/eval/<split>_<mode>/``, and every image's
  ``real_A``/``fake_B``/``real_B`` (with an index.html) in
  ``<workdir>/eval/<split>_<mode>_step<N>/``. The split's real Inception
  features are kept in ``<workdir>/eval/real_features/``, under a hash of its
  files' bytes, for the next checkpoint. ``workdir`` may be a URL
  (``gs://...``), as in training.
  """
  _check_batch_size(batch_size)
  run = checkpoint.load_run(workdir, step, pix2pix=pix2pix)
  config = run.config
  if data_dir is not None:
    config.data_dir = data_dir
  if scorer is None:
    weights = perceptual.load_weights()
    perceptual.warn_missing(weights)
    scorer = perceptual.Scorer(weights)
  source = (input_pipeline.pair_source(config, split) if split else
            input_pipeline.pair_source(config, config.eval_split, named_by="config.eval_split"))
  step, split = int(run.state.step), split or config.eval_split
  out = checkpoint.workdir_path(workdir) / EVAL_DIR
  out.mkdir(parents=True, exist_ok=True)
  cache = None
  if scorer.weights.inception is not None:
    cache = out / REAL_FEATURES_DIR / f"{_real_features_key(source, config)}.npy"
    if scorer.needs_real_features and cache.exists():
      with cache.open("rb") as file:
        scorer = scorer.with_real_features(np.load(file))
      logging.info("The real images' Inception features: from %s.", cache)
  name = f"{split}_{mode}_step{step}"
  means, sheet = evaluate(run.state, run.pix2pix.generator, config, split=split, mode=mode,
                          batch_size=batch_size, scorer=scorer, results_dir=out / name, source=source)
  if cache is not None and not cache.exists():
    cache.parent.mkdir(parents=True, exist_ok=True)
    with cache.open("wb") as file:
      np.save(file, scorer.real_features())
  results = {"step": step, "split": split, "mode": mode, "dataset": config.dataset, **means}
  if scorer.weights.missing:
    results["missing_metrics"] = scorer.weights.missing

  (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
  summaries.write_samples(out / f"{split}_{mode}", step, sheet)
  writer = summaries.create_writer(out)
  writer.write_scalars(step, {f"{split}_{mode}/{key}": means[key]
                              for key in ("l1", "psnr", "ssim", *perceptual.METRICS) if key in means})
  writer.write_images(step, {f"{split}_{mode}/samples": sheet[None]})
  writer.close()
  return results


def _real_features_key(source: input_pipeline.PairSource, config: ml_collections.ConfigDict) -> str:
  """The split's files read as bytes (cheap next to the features): a changed file is a new key."""
  encoded = (b"".join(t.numpy() for t in source.read(tf.constant(i))) for i in range(source.num_examples))
  return perceptual.real_features_key(encoded, config.crop_size, config.direction)


def evaluate_checkpoints(workdir, *, split: Optional[str] = None, mode: str = "eval", batch_size: int = 8,
                         data_dir: Optional[str] = None,
                         pix2pix: Optional[recipe.Pix2Pix] = None) -> Dict[str, Any]:
  """Evaluates every kept checkpoint and names the best by FID; returns and writes the summary.

  The split's real features are computed once (then read from the cache
  ``evaluate_checkpoint`` keeps). Writes each checkpoint's
  results as ``evaluate_checkpoint`` does, and
  ``<workdir>/eval/<split>_<mode>_all.json``: every step's results and
  ``best_step``, the lowest FID.
  """
  _check_batch_size(batch_size)
  weights = perceptual.load_weights()
  if weights.inception is None:
    raise ValueError(f"all_checkpoints=True names the best checkpoint by FID: {weights.missing[0]}.")
  perceptual.warn_missing(weights)
  steps = checkpoint.checkpoint_steps(workdir)
  per_step = []
  for index, step in enumerate(steps):  # After the first, the real features come from the workdir's cache.
    logging.info("Checkpoint %d of %d: step %d.", index + 1, len(steps), step)
    per_step.append(evaluate_checkpoint(workdir, step=step, split=split, mode=mode, batch_size=batch_size,
                                        data_dir=data_dir, pix2pix=pix2pix, scorer=perceptual.Scorer(weights)))
  best = min(per_step, key=lambda r: r["fid"])
  summary = {"best_step": best["step"], "best_fid": best["fid"], "split": best["split"], "mode": mode,
             "checkpoints": per_step}
  out = checkpoint.workdir_path(workdir) / EVAL_DIR
  (out / f"{best['split']}_{mode}_all.json").write_text(json.dumps(summary, indent=2) + "\n")
  logging.info("Best checkpoint by FID: step %d (FID %.3f).", best["step"], best["fid"])
  return summary
