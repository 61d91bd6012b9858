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
from typing import Any, Callable, Dict, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow as tf
import tqdm

from p2p_jax import checkpoint, colour, images, input_pipeline, metrics, perceptual, recipe, summaries, train

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


TILE_SIZE = 1024  # Larger images translate in overlapping tiles of this side: bounded memory.


def _pad_to_multiple(images: np.ndarray, multiple: int) -> Tuple[np.ndarray, Tuple[int, int]]:
  """Reflect-pads NHWC ``images`` on all sides to multiples of ``multiple``; returns them and (top, left)."""
  _, height, width, _ = images.shape
  extra = (-height % multiple, -width % multiple)
  pads = [(0, 0), (extra[0] // 2, extra[0] - extra[0] // 2), (extra[1] // 2, extra[1] - extra[1] // 2), (0, 0)]
  return np.pad(images, pads, mode="reflect" if min(height, width) > 1 else "edge"), (pads[1][0], pads[2][0])


def _tile_starts(side: int, tile: int, overlap: int) -> List[int]:
  if side <= tile:
    return [0]
  starts = list(range(0, side - tile, tile - overlap))
  return starts + [side - tile]


def _ramp(length: int, start: int, side: int, overlap: int) -> np.ndarray:
  """A tile's blending weights along one axis: rising over the overlap wherever a neighbour shares it."""
  weights = np.ones(length, np.float32)
  rise = (np.arange(overlap, dtype=np.float32) + 0.5) / overlap
  if start > 0:
    weights[:overlap] = rise
  if start + length < side:
    weights[-overlap:] = np.minimum(weights[-overlap:], rise[::-1])
  return weights


def generate(translate: Callable, images: np.ndarray, indices: np.ndarray, *, multiple: int,
             tile_size: int = TILE_SIZE, overlap: Optional[int] = None) -> np.ndarray:
  """The generator's outputs for NHWC ``images`` of any size, at that size.

  ``translate(batch, indices)`` runs the network on sides that are multiples
  of ``multiple`` (``make_translate_fn``). Images are reflect-padded to such
  sides and the outputs cropped back. An image with a side over ``tile_size``
  runs tile by tile (``tile_size`` squares, ``overlap`` pixels, by default an
  eighth of a tile, shared and blended linearly), so memory is bounded
  whatever its size; in ``"paper"``
  mode each tile is then normalised with its own statistics.
  """
  overlap = tile_size // 8 if overlap is None else overlap
  if tile_size % multiple or not 0 < overlap < tile_size:
    raise ValueError(f"tile_size={tile_size} must be a multiple of {multiple} (the network's) and larger "
                     f"than the overlap, {overlap} (at least 1).")
  _, height, width, _ = images.shape
  padded, (top, left) = _pad_to_multiple(np.asarray(images, np.float32), multiple)
  if max(padded.shape[1:3]) <= tile_size:
    return np.asarray(translate(padded, indices))[:, top:top + height, left:left + width]
  return np.stack([_generate_tiled(translate, image, index, tile_size, overlap)[top:top + height, left:left + width]
                   for image, index in zip(padded, indices)])


def _generate_tiled(translate, image: np.ndarray, index, tile_size: int, overlap: int) -> np.ndarray:
  height, width, _ = image.shape
  tile_h, tile_w = min(tile_size, height), min(tile_size, width)
  total, weight = None, np.zeros((height, width, 1), np.float32)
  for y in _tile_starts(height, tile_h, overlap):
    for x in _tile_starts(width, tile_w, overlap):
      out = np.asarray(translate(image[None, y:y + tile_h, x:x + tile_w], np.asarray([index])))[0]
      if total is None:
        total = np.zeros((height, width, out.shape[-1]), np.float32)
      w = (_ramp(tile_h, y, height, overlap)[:, None] * _ramp(tile_w, x, width, overlap)[None, :])[..., None]
      total[y:y + tile_h, x:x + tile_w] += w * out
      weight[y:y + tile_h, x:x + tile_w] += w
  return total / weight


def viewable(config: ml_collections.ConfigDict, source, image) -> np.ndarray:
  """``image``, the model's output or target for ``source``, as the image it stands for.

  In colorization mode, the RGB image of L (``source``) and ab (``image``);
  otherwise ``image`` itself. Metrics, sheets and written results use it.
  """
  if config.dataset_mode == "colorization":
    return colour.to_rgb(source, image)
  return np.asarray(image)


def viewable_channels(config: ml_collections.ConfigDict) -> int:
  return 3 if config.dataset_mode == "colorization" else config.output_nc


def size_multiple(generator) -> int:
  """What the sides of ``generator``'s input must be a multiple of: its ``size_multiple``, else 1."""
  return int(getattr(generator, "size_multiple", 1))


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

  Scores are of the ``viewable`` images (RGB in colorization mode). Each
  image is translated at the size ``input_pipeline.eval_transform``
  gives it (``generate``). Single-process; ``seed`` draws the dropout masks in
  ``"paper"`` mode. ``results_dir``: where to write every image's ``real_A``,
  ``fake_B`` and ``real_B`` with an index.html
  (``summaries.write_result_images``). ``source``, if given, is the split,
  opened already (its files checked).
  """
  translate = jax.jit(make_translate_fn(generator, mode))
  run = lambda images, indices: translate(state, images, jax.random.key(seed), indices)
  if source is None:
    source = (input_pipeline.pair_source(config, split) if split else
              input_pipeline.pair_source(config, config.eval_split, named_by="config.eval_split"))
  if scorer is not None and perceptual.unscorable(viewable_channels(config)):
    logging.warning("%s.", perceptual.unscorable(viewable_channels(config)))
    scorer = None
  names = result_names(source.filenames)
  dataset = input_pipeline.make_eval_dataset(config, batch_size=batch_size, source=source)
  totals, count, sheet_parts = {}, 0, []
  computed = ", ".join(["l1", "psnr", "ssim", *(scorer.available if scorer else [])])
  with tqdm.tqdm(total=source.num_examples, desc=f"Evaluating ({computed})", unit="image",
                 disable=not sys.stderr.isatty(), leave=False) as bar:
    for batch in dataset.as_numpy_iterator():
      n = len(batch["A"])
      generated = generate(run, batch["A"], batch["index"], multiple=size_multiple(generator))
      generated, target = viewable(config, batch["A"], generated), viewable(config, batch["A"], batch["B"])
      for name, values in jax.device_get(metrics.image_metrics(generated, target)).items():
        totals[name] = totals.get(name, 0.0) + float(np.sum(values))
      if scorer is not None:
        scorer.add(generated, target)
      if results_dir is not None:
        summaries.write_result_images(results_dir, [names[i] for i in batch["index"]], batch["A"], generated,
                                      target, source.model_bits(config.direction))
      count += n
      bar.update(n)
      if (sum(len(p[0]) for p in sheet_parts) < config.num_sample_images
          and (not sheet_parts or sheet_parts[0][0].shape[1:] == batch["A"].shape[1:])):
        sheet_parts.append((batch["A"], generated, target))
  if not count:
    raise ValueError(f"The eval split {split or config.eval_split!r} of {config.dataset!r} is empty.")
  columns = [np.concatenate(c)[:config.num_sample_images] for c in zip(*sheet_parts)]
  means = {name: total / count for name, total in totals.items()}
  if scorer is not None:
    means.update(scorer.results())
  means["num_images"] = count
  if results_dir is not None:
    summaries.write_results_index(results_dir, names, (config.input_nc, viewable_channels(config)))
  return means, summaries.sample_sheet(*columns)


def list_images(path, channels: int) -> List[Tuple[pathlib.Path, images.ImageInfo]]:
  """``path`` itself, or the images in folder ``path``, each with what it holds.

  Each is decoded once here, so every unreadable input, or one whose channels
  a ``channels``-channel model cannot take, is named before the checkpoint is
  loaded or anything is written.
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
  infos = images.decode_all(paths)
  errors = [f"Cannot read image {p}: {info}" if isinstance(info, Exception) else
            f"Image {p}: {images.channel_error(info, channels)}" for p, info in zip(paths, infos)
            if isinstance(info, Exception) or images.channel_error(info, channels)]
  if errors:
    more = f"; and {len(errors) - _MAX_NAMED} more" if len(errors) > _MAX_NAMED else ""
    raise ValueError(f"input_path={path}: {len(errors)} of {len(paths)} images cannot be translated. "
                     f"{'; '.join(errors[:_MAX_NAMED])}{more}")
  return list(zip(paths, infos))


def _check_batch_size(batch_size: int) -> None:
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}: must be positive.")


SIZES = ("train", "native")


def translate_paths(workdir, input_path, output_dir, *, step: Optional[int] = None,
                    mode: str = "eval", batch_size: int = 8, seed: int = 0, size: str = "train",
                    pix2pix: Optional[recipe.Pix2Pix] = None) -> List[pathlib.Path]:
  """Translates the image(s) at ``input_path`` into ``output_dir``; returns the written paths.

  Each image is translated in the direction the run was trained in, at the
  size the run's deterministic training transform gives it (``size="train"``,
  ``input_pipeline.eval_transform``) or at its own (``"native"``), and the
  result, at the input's size and bit depth, saved as ``output_dir/<name>.png``
  (``.tif`` for channel counts other than 1 and 3). Channels are converted to
  the model's as in training (``images``). ``pix2pix`` gives the networks of a
  run trained with networks given as Python objects.
  """
  _check_batch_size(batch_size)
  if size not in SIZES:
    raise ValueError(f"size={size!r}: must be one of {SIZES}.")
  output_dir = pathlib.Path(output_dir).expanduser()
  if output_dir.exists() and not output_dir.is_dir():
    raise ValueError(f"output_dir={output_dir} is a file: give a folder for the translated images.")
  config = checkpoint.load_config(workdir, step)
  listed = list_images(input_path, config.input_nc)
  paths = [p for p, _ in listed]
  if output_dir.resolve() in {p.parent.resolve() for p in paths}:
    raise ValueError(f"output_dir={output_dir} is the input folder: choose another folder, so no "
                     "input is overwritten.")
  stems = [p.stem for p in paths]
  clashes = sorted({s for s in stems if stems.count(s) > 1})
  if clashes:
    raise ValueError(f"input_path={input_path}: several files would be written as "
                     f"{output_dir / (clashes[0] + '.png')}; rename them apart.")
  run = checkpoint.load_run(workdir, step, pix2pix=pix2pix)
  logging.info("Translating %d image(s) with the step %d generator (config.direction=%s, mode=%s, "
               "size=%s).", len(paths), int(run.state.step), config.direction, mode, size)
  translate = jax.jit(make_translate_fn(run.pix2pix.generator, mode))
  network = lambda batch, indices: translate(run.state, batch, jax.random.key(seed), indices)
  multiple = size_multiple(run.pix2pix.generator)
  output_dir.mkdir(parents=True, exist_ok=True)
  written, group = [], []

  def flush():
    """Translates the group (images of one shape) in one call, padded to batch_size: one compilation."""
    batch = np.stack([image for _, _, _, image in group])
    if max(batch.shape[1:3]) <= TILE_SIZE:
      batch = np.concatenate([batch, np.zeros((batch_size - len(group), *batch.shape[1:]), np.float32)])
    indices = np.arange(len(batch)) + group[0][0]
    for (_, (path, info), original, _), result in zip(group, generate(network, batch, indices, multiple=multiple)):
      if result.shape[:2] != (info.height, info.width):
        result = tf.image.resize(result, (info.height, info.width), method="bicubic").numpy()
      result = viewable(config, original, result)  # colorization: the ab on the photo's own L
      target = output_dir / f"{path.stem}{images.extension(result.shape[-1])}"
      target.write_bytes(images.encode(result, info.bits))
      written.append(target)
    group.clear()

  for index, (path, info) in enumerate(listed):
    original = image = _model_input(path, info, config)
    if size == "train":
      image, _ = input_pipeline.eval_transform(image, None, config)
    image = np.asarray(image)
    if group and (group[0][3].shape != image.shape or len(group) == batch_size):
      flush()
    group.append((index, (path, info), original, image))
    if max(image.shape[:2]) > TILE_SIZE:  # tiled: alone
      flush()
  if group:
    flush()
  return written


def _model_input(path, info: images.ImageInfo, config: ml_collections.ConfigDict) -> np.ndarray:
  """The image at ``path`` as the model takes it: in [-1, 1] with its channels (L in colorization mode)."""
  pixels = images.read(path, 3 if config.dataset_mode == "colorization" else config.input_nc, info)
  return np.asarray(input_pipeline.to_model_range(pixels, pixels, (info.bits, info.bits), config)[0])


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
  if scorer.weights.inception is not None and not perceptual.unscorable(viewable_channels(config)):
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
  missing = scorer.weights.missing + [m for m in [perceptual.unscorable(viewable_channels(config))] if m]
  if missing:
    results["missing_metrics"] = missing

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
  settings = (f"{config.dataset_mode} {config.preprocess} {config.load_size} {config.crop_size} "
              f"{config.direction} {config.input_nc} {config.output_nc}")
  return perceptual.real_features_key(encoded, settings)


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
