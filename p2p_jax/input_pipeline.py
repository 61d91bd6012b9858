"""Paired-image input: sources, the reference's preprocessing, and a resumable stream.

Training examples form one endless stream of positions q = 0, 1, 2, ...:
position q is example ``perm(seed, epoch)[q % N]`` of epoch ``q // N``, and its
jitter (crop offset, flip) comes from stateless ops seeded by (seed, epoch,
example index). Global batch k is positions [k*B, (k+1)*B), and process p of P
decodes only its slice [k*B + p*B/P, k*B + (p+1)*B/P). So the global batches
are a function of the seed alone, whatever the number of hosts, and a run
resumed at step k reads exactly what an uninterrupted run would have.
"""

import dataclasses
import fractions
import pathlib
from typing import Callable, List, Optional, Tuple

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from p2p_jax import images
from p2p_jax.datasets import pix2pix, synthetic


class DatasetUnavailableError(RuntimeError):
  """A TFDS dataset could not be downloaded or built; the message says where to put its archive."""


@dataclasses.dataclass(frozen=True)
class PairSource:
  """Random access to the encoded pairs of one split.

  ``read(index)`` is a TF function returning ``(encoded_a, encoded_b)``; for
  side-by-side files ``encoded_b`` is empty and A|B are split after decoding.
  """
  description: str
  filenames: List[str]
  read: Callable[[tf.Tensor], Tuple[tf.Tensor, tf.Tensor]]
  side_by_side: bool

  @property
  def num_examples(self) -> int:
    return len(self.filenames)


def _check_images(paths: List[pathlib.Path], side_by_side: bool, skip_bad_files: bool) -> List[pathlib.Path]:
  """Decodes every file once, so a bad one is named before any training."""
  sizes = images.decode_all(paths)
  good, bad = [], []
  for path, size in zip(paths, sizes):
    if isinstance(size, Exception):
      if not skip_bad_files:
        raise ValueError(f"Cannot decode image {path}: {size}. Remove or replace it, or set "
                         "config.skip_bad_files=True to skip such files with a warning.")
      bad.append(path)
      continue
    width, height = size
    if side_by_side and width < pix2pix.PAIR_MIN_ASPECT * height:
      raise pix2pix.not_a_pair_error(path, width, height)
    good.append(path)
  if bad:
    logging.warning("Skipped %d of %d files that do not decode (config.skip_bad_files=True), e.g. %s",
                    len(bad), len(paths), bad[0])
  if not good:
    raise ValueError(f"No decodable images among the {len(paths)} files of {paths[0].parent}.")
  return good


def _splits_of(root: pathlib.Path) -> List[str]:
  """The sub-folders of ``root`` that hold images, side by side or in A/ and B/."""
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir() if d.is_dir() and (
      images.image_files(d) or ((d / "A").is_dir() and (d / "B").is_dir())))


def _folder_source(root: pathlib.Path, split: str, named_by: str, skip_bad_files: bool,
                   cache: bool) -> PairSource:
  """``root/split/*.jpg`` side by side, or ``root/split/{A,B}/`` with matching names."""
  split_dir = root / split
  a_dir, b_dir = split_dir / "A", split_dir / "B"
  if a_dir.is_dir() and b_dir.is_dir():
    a_files = images.image_files(a_dir)
    b_names = {p.name for p in images.image_files(b_dir)}
    missing = [p.name for p in a_files if p.name not in b_names]
    if missing:
      raise ValueError(f"{len(missing)} images in {a_dir} have no namesake in {b_dir}, e.g. {missing[0]!r}.")
    a_files = _check_images(a_files, False, skip_bad_files)
    b_files = _check_images([b_dir / p.name for p in a_files], False, skip_bad_files)
    b_names = {p.name for p in b_files}
    a_files = [p for p in a_files if p.name in b_names]
    pairs = (a_files, [b_dir / p.name for p in a_files])
    side_by_side = False
  else:
    files = images.image_files(split_dir) if split_dir.is_dir() else []
    if not files:
      raise ValueError(
          f"{named_by}={split!r}: no images for this split of dataset {root}: looked for "
          f"{split_dir}/*{{{','.join(images.IMAGE_EXTENSIONS)}}} (A|B side by side) and for the folders "
          f"{a_dir} and {b_dir}; the splits there are {_splits_of(root)}.")
    pairs = (_check_images(files, True, skip_bad_files), None)
    side_by_side = True
  a_paths = tf.constant([str(p) for p in pairs[0]])
  b_paths = tf.constant([str(p) for p in pairs[1]]) if pairs[1] else None
  if cache:  # Keep the encoded files in memory: one read per file per run.
    a_paths = tf.constant([p.read_bytes() for p in pairs[0]])
    b_paths = tf.constant([p.read_bytes() for p in pairs[1]]) if pairs[1] else None
  load = (lambda x: x) if cache else tf.io.read_file

  def read(index):
    encoded_b = load(tf.gather(b_paths, index)) if b_paths is not None else tf.constant(b"")
    return load(tf.gather(a_paths, index)), encoded_b

  return PairSource(f"{split_dir}", [p.name for p in pairs[0]], read, side_by_side)


def _tfds_source(name: str, split: str, named_by: str, data_dir: str, verify_checksums: bool) -> PairSource:
  import tensorflow_datasets as tfds

  config_name = name.split("/", 1)[1]
  if config_name not in pix2pix.DATASETS:
    raise ValueError(f"config.dataset={name!r}: no such pix2pix dataset; known: "
                     f"{['pix2pix/' + n for n in pix2pix.DATASETS]}.")
  builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record",
                         verify_checksums=verify_checksums)
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as error:  # pylint: disable=broad-except
    raise DatasetUnavailableError(
        f"Could not prepare {name} in {builder.data_dir}: {type(error).__name__}: {error}\n"
        f"With no network, put {config_name}.tar.gz from {pix2pix.URL.format(name=config_name)} "
        f"into {pathlib.Path(builder.data_dir_root) / 'downloads' / 'manual'} and run again.") from error
  if split not in builder.info.splits:
    raise ValueError(f"{named_by}={split!r}: dataset {name} has no such split; it has "
                     f"{sorted(builder.info.splits)}.")
  source = builder.as_data_source(split, decoders={"A": tfds.decode.SkipDecoding(),
                                                   "B": tfds.decode.SkipDecoding()})
  filenames = [source[i]["filename"].decode() for i in range(len(source))]

  def fetch(index):
    example = source[int(index)]
    return example["A"], example["B"]

  def read(index):
    encoded_a, encoded_b = tf.py_function(fetch, [index], [tf.string, tf.string])
    return tf.ensure_shape(encoded_a, []), tf.ensure_shape(encoded_b, [])

  return PairSource(f"{name}:{split}", filenames, read, side_by_side=False)


def pair_source(config: ml_collections.ConfigDict, split: str, *, named_by: str = "split") -> PairSource:
  """The source named by ``config.dataset``: "synthetic", "pix2pix/<name>" or a folder.

  ``named_by`` is where ``split`` came from (``config.eval_split``, an
  argument), which an error about the split names.
  """
  if config.dataset == "synthetic":
    return _folder_source(synthetic.ensure_dataset(config.data_dir, config.seed), split, named_by, False,
                          config.cache)
  if config.dataset.startswith("pix2pix/"):
    return _tfds_source(config.dataset, split, named_by, config.data_dir, config.verify_checksums)
  root = pathlib.Path(config.dataset).expanduser()
  if not root.is_dir():
    raise ValueError(f"config.dataset={config.dataset!r} is neither 'synthetic', 'pix2pix/<name>' "
                     "nor an existing folder in the pix2pix layout (<folder>/<split>/*.jpg).")
  return _folder_source(root, split, named_by, config.skip_bad_files, config.cache)


def num_examples(config: ml_collections.ConfigDict, split: str) -> int:
  return pair_source(config, split).num_examples


def steps_per_epoch(config: ml_collections.ConfigDict, source: Optional[PairSource] = None) -> fractions.Fraction:
  """Global batches per epoch of the training split, as an exact fraction (``source``: that split).

  The stream is one sequence of epochs (module docstring), so a batch can hold
  the last examples of one epoch and the first of the next: N examples in
  batches of B take N / B steps per epoch. The reference's DataLoader instead
  ends each epoch with a short batch, ceil(N / B) steps; the epochs, and so
  the learning-rate schedule in epochs, are the same.
  """
  source = source or pair_source(config, config.train_split, named_by="config.train_split")
  return fractions.Fraction(source.num_examples, config.batch_size)


def _decode_pair(encoded_a, encoded_b, side_by_side: bool, direction: str):
  decode = lambda x: tf.io.decode_image(x, channels=3, expand_animations=False)
  if side_by_side:
    ab = decode(encoded_a)
    half = tf.shape(ab)[1] // 2  # B takes the odd column, as the reference's AB.crop((w2, 0, w, h)).
    a, b = ab[:, :half], ab[:, half:]
  else:
    a, b = decode(encoded_a), decode(encoded_b)
  return (b, a) if direction == "BtoA" else (a, b)


def _resize(image, height, width):
  """Bicubic, as PIL's BICUBIC that the reference uses, antialiased when shrinking.

  Antialiasing changes nothing when enlarging but costs twice the time there.
  """
  shape = tf.shape(image)
  shrinks = tf.logical_or(shape[0] > height, shape[1] > width)
  resize = lambda antialias: tf.image.resize(image, (height, width), method="bicubic", antialias=antialias)
  return tf.cond(shrinks, lambda: resize(True), lambda: resize(False))


def jitter_params(height, width, config: ml_collections.ConfigDict, seed):
  """``(top, left, flip)`` of the random crop and flip: the reference's ``get_params``.

  Drawn from the stateless ``seed`` of (config.seed, epoch, example), for an
  image of ``height`` x ``width`` after the resize.
  """
  crop = config.crop_size
  top = tf.random.stateless_uniform([], _fold_in(seed, 0), 0, height - crop + 1, tf.int32)
  left = tf.random.stateless_uniform([], _fold_in(seed, 1), 0, width - crop + 1, tf.int32)
  flip = tf.logical_and(not config.no_flip, tf.random.stateless_uniform([], _fold_in(seed, 2)) < 0.5)
  return top, left, flip


def _jitter(a, b, config, seed):
  """The reference's train-time transform, identical for A and B."""
  crop, load = config.crop_size, config.load_size
  if config.preprocess == "resize_and_crop":
    a, b = _resize(a, load, load), _resize(b, load, load)
  elif config.preprocess == "scale_width":
    shape = tf.cast(tf.shape(a), tf.float32)
    height = tf.cast(tf.maximum(shape[0] * load / shape[1], crop), tf.int32)  # int() as the reference
    a, b = _resize(a, height, load), _resize(b, height, load)
  elif config.preprocess == "none":  # The reference keeps any size; batches need crop_size.
    a, b = _resize(a, crop, crop), _resize(b, crop, crop)
  else:  # crop from the original size, which must be at least crop_size.
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
  shape = tf.shape(a)
  tf.debugging.assert_greater_equal(
      shape[:2], crop, message=f"an image is smaller than config.crop_size={crop} for preprocess={config.preprocess!r}")
  top, left, flip = jitter_params(shape[0], shape[1], config, seed)
  a, b = a[top:top + crop, left:left + crop], b[top:top + crop, left:left + crop]
  return tf.cond(flip, lambda: (a[:, ::-1], b[:, ::-1]), lambda: (a, b))


def _to_unit_range(image):
  return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0) / 127.5 - 1.0


def _fold_in(seed, *data):
  for value in data:
    seed = tf.random.experimental.stateless_fold_in(seed, value)
  return seed


def _stream_positions(num: int, seed: int, start_step: int, global_batch: int, local_batch: int,
                      process_index: int) -> tf.data.Dataset:
  """(epoch, example index) of this process's slice of each global batch, from start_step on.

  Pure tf.data (no Python generator), so it never holds the GIL from a worker.
  """
  first = start_step * global_batch
  base_seed = tf.constant([seed, 1], tf.int64)

  def epoch_positions(epoch):
    perm = tf.random.experimental.stateless_shuffle(tf.range(num, dtype=tf.int64), _fold_in(base_seed, epoch))
    positions = epoch * num + tf.range(num, dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices((positions, tf.fill([num], epoch), perm))

  mine = lambda position, epoch, index: (position % global_batch) // local_batch == process_index
  return (tf.data.Dataset.range(first // num, np.iinfo(np.int64).max)
          .flat_map(epoch_positions)
          .skip(first % num)
          .filter(mine)
          .map(lambda position, epoch, index: (epoch, index)))


def make_train_dataset(config: ml_collections.ConfigDict, *, start_step: int = 0,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       source: Optional[PairSource] = None) -> tf.data.Dataset:
  """The endless, jittered training stream of local batches {"A", "B"} in [-1, 1].

  ``config`` is assumed checked (``configuration.check``); ``source``, if
  given, is its training split, opened already.
  """
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  source = source or pair_source(config, config.train_split, named_by="config.train_split")
  local_batch = config.batch_size // process_count
  positions = _stream_positions(source.num_examples, config.seed, start_step, config.batch_size,
                                local_batch, process_index)

  def load(epoch, index):
    a, b = _decode_pair(*source.read(index), source.side_by_side, config.direction)
    a, b = _jitter(a, b, config, _fold_in(tf.constant([config.seed, 0], tf.int64), epoch, index))
    return {"A": _to_unit_range(a), "B": _to_unit_range(b)}

  options = tf.data.Options()
  options.deterministic = True
  return (positions.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(local_batch, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE)
          .with_options(options))


def make_eval_dataset(config: ml_collections.ConfigDict, *, batch_size: Optional[int] = None,
                      split: Optional[str] = None, source: Optional[PairSource] = None) -> tf.data.Dataset:
  """The eval split in order, resized to crop_size, no jitter; the last batch may be short.

  ``source``, if given, is that split, opened already.
  """
  if source is None:
    source = (pair_source(config, split) if split else
              pair_source(config, config.eval_split, named_by="config.eval_split"))
  filenames = tf.constant(source.filenames)

  def load(index):
    a, b = _decode_pair(*source.read(index), source.side_by_side, config.direction)
    size = config.crop_size
    return {"A": _to_unit_range(_resize(a, size, size)), "B": _to_unit_range(_resize(b, size, size)),
            "filename": tf.gather(filenames, index)}

  return (tf.data.Dataset.range(source.num_examples)
          .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(batch_size or config.batch_size)
          .prefetch(tf.data.AUTOTUNE))


def shard_for_devices(batch, num_devices: int):
  """Reshapes each [n, ...] array to [num_devices, n // num_devices, ...] for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"A batch of {x.shape[0]} examples cannot be split evenly over "
                       f"{num_devices} devices: use a batch size that is a multiple of {num_devices}.")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)
