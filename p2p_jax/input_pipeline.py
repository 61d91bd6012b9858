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

from p2p_jax import colour, images, models
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
  bits: Tuple[int, int] = (8, 8)  # of the files' A and B sides
  sizes: Optional[List[Tuple[int, int]]] = None  # (height, width) of each model input, where known

  def model_bits(self, direction: str) -> Tuple[int, int]:
    """The bits of the model's (input, target) files."""
    return self.bits[::-1] if direction == "BtoA" else self.bits

  @property
  def num_examples(self) -> int:
    return len(self.filenames)


def _check_images(paths: List[pathlib.Path], side_by_side: bool, skip_bad_files: bool,
                  channels: Tuple[int, ...]) -> Tuple[List[pathlib.Path], int, List[Tuple[int, int]]]:
  """Decodes every file once, so a bad one is named before any training.

  Returns the good files, their bit depth and their (height, width).

  ``channels``: what the model takes from these files (input, target or both
  for side-by-side pairs). Every file of a folder must have the same bit depth,
  by which its samples are scaled.
  """
  infos = images.decode_all(paths)
  good, bad, bits, sizes = [], [], {}, []
  for path, info in zip(paths, infos):
    if isinstance(info, Exception):
      if not skip_bad_files:
        raise ValueError(f"Cannot decode image {path}: {info}. Remove or replace it, or set "
                         "config.skip_bad_files=True to skip such files with a warning.")
      bad.append(path)
      continue
    if side_by_side and info.width < pix2pix.PAIR_MIN_ASPECT * info.height:
      raise pix2pix.not_a_pair_error(path, info.width, info.height)
    for count in channels:
      reason = images.channel_error(info, count)
      if reason:
        raise ValueError(f"Image {path}: {reason} (config.input_nc / config.output_nc).")
    bits.setdefault(info.bits, path)
    good.append(path)
    sizes.append((info.height, info.width // 2 if side_by_side else info.width))
  if bad:
    logging.warning("Skipped %d of %d files that do not decode (config.skip_bad_files=True), e.g. %s",
                    len(bad), len(paths), bad[0])
  if not good:
    raise ValueError(f"No decodable images among the {len(paths)} files of {paths[0].parent}.")
  if len(bits) > 1:
    raise ValueError(f"Image {bits[16]} is 16-bit but {bits[8]} in the same folder is 8-bit: the images of "
                     "a folder share one bit depth, by which they are scaled to [-1, 1]; convert them to one.")
  return good, next(iter(bits)), sizes


def _splits_of(root: pathlib.Path) -> List[str]:
  """The sub-folders of ``root`` that hold images, side by side or in A/ and B/."""
  if not root.is_dir():
    return []
  return sorted(d.name for d in root.iterdir() if d.is_dir() and (
      images.image_files(d) or ((d / "A").is_dir() and (d / "B").is_dir())))


def _folder_source(root: pathlib.Path, split: str, named_by: str, config: ml_collections.ConfigDict) -> PairSource:
  """``root/split/*.jpg`` side by side, or ``root/split/{A,B}/`` with matching names."""
  skip_bad_files, cache = config.skip_bad_files, config.cache
  a_channels, b_channels = config.input_nc, config.output_nc
  if config.direction == "BtoA":
    a_channels, b_channels = b_channels, a_channels
  split_dir = root / split
  a_dir, b_dir = split_dir / "A", split_dir / "B"
  if config.dataset_mode == "colorization":  # colour photos, each its own L and ab
    files = images.image_files(split_dir) if split_dir.is_dir() else []
    if not files:
      raise ValueError(f"{named_by}={split!r}: no images in {split_dir} for config.dataset_mode='colorization', "
                       f"which reads colour photos {split_dir}/*{{{','.join(images.IMAGE_EXTENSIONS)}}}.")
    files, file_bits, sizes = _check_images(files, False, skip_bad_files, (3,))
    pairs, side_by_side, bits = (files, None), False, (file_bits, file_bits)
  elif a_dir.is_dir() and b_dir.is_dir():
    a_files = images.image_files(a_dir)
    b_names = {p.name for p in images.image_files(b_dir)}
    missing = [p.name for p in a_files if p.name not in b_names]
    if missing:
      raise ValueError(f"{len(missing)} images in {a_dir} have no namesake in {b_dir}, e.g. {missing[0]!r}.")
    a_files, a_bits, a_sizes = _check_images(a_files, False, skip_bad_files, (a_channels,))
    b_files, b_bits, b_sizes = _check_images([b_dir / p.name for p in a_files], False, skip_bad_files,
                                             (b_channels,))
    b_sizes = dict(zip((p.name for p in b_files), b_sizes))
    kept = [(p, size) for p, size in zip(a_files, a_sizes) if p.name in b_sizes]
    pairs = ([p for p, _ in kept], [b_dir / p.name for p, _ in kept])
    sizes = [size for _, size in kept] if config.direction == "AtoB" else [b_sizes[p.name] for p, _ in kept]
    side_by_side, bits = False, (a_bits, b_bits)
  else:
    files = images.image_files(split_dir) if split_dir.is_dir() else []
    if not files:
      raise ValueError(
          f"{named_by}={split!r}: no images for this split of dataset {root}: looked for "
          f"{split_dir}/*{{{','.join(images.IMAGE_EXTENSIONS)}}} (A|B side by side) and for the folders "
          f"{a_dir} and {b_dir}; the splits there are {_splits_of(root)}.")
    files, file_bits, sizes = _check_images(files, True, skip_bad_files, (a_channels, b_channels))
    pairs, side_by_side, bits = (files, None), True, (file_bits, file_bits)
  a_paths = tf.constant([str(p) for p in pairs[0]])
  b_paths = tf.constant([str(p) for p in pairs[1]]) if pairs[1] else None
  if cache:  # Keep the encoded files in memory: one read per file per run.
    a_paths = tf.constant([p.read_bytes() for p in pairs[0]])
    b_paths = tf.constant([p.read_bytes() for p in pairs[1]]) if pairs[1] else None
  load = (lambda x: x) if cache else tf.io.read_file

  def read(index):
    encoded_b = load(tf.gather(b_paths, index)) if b_paths is not None else tf.constant(b"")
    return load(tf.gather(a_paths, index)), encoded_b

  return PairSource(f"{split_dir}", [p.name for p in pairs[0]], read, side_by_side, bits, sizes)


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
    return _folder_source(synthetic.ensure_dataset(config.data_dir, config.seed), split, named_by, config)
  if config.dataset.startswith("pix2pix/"):
    if config.dataset_mode == "colorization":
      raise ValueError(f"config.dataset_mode='colorization' reads a folder of colour photos, not "
                       f"config.dataset={config.dataset!r}.")
    return _tfds_source(config.dataset, split, named_by, config.data_dir, config.verify_checksums)
  root = pathlib.Path(config.dataset).expanduser()
  if not root.is_dir():
    raise ValueError(f"config.dataset={config.dataset!r} is neither 'synthetic', 'pix2pix/<name>' "
                     "nor an existing folder in the pix2pix layout (<folder>/<split>/*.jpg).")
  return _folder_source(root, split, named_by, config)


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


def _decode_pair(encoded_a, encoded_b, source: PairSource, config: ml_collections.ConfigDict):
  """The model's (input, target) as float32 in their files' range, with config.input_nc / output_nc channels.

  In colorization mode both are the photo in RGB, which ``to_model_range`` splits into L and ab.
  """
  if config.dataset_mode == "colorization":
    rgb = images.to_channels(tf.cast(images.decode(encoded_a, source.bits[0]), tf.float32), 3)
    return rgb, rgb
  if source.side_by_side:
    ab = images.decode(encoded_a, source.bits[0])
    half = tf.shape(ab)[1] // 2  # B takes the odd column, as the reference's AB.crop((w2, 0, w, h)).
    a, b = ab[:, :half], ab[:, half:]
  else:
    a, b = images.decode(encoded_a, source.bits[0]), images.decode(encoded_b, source.bits[1])
  if config.direction == "BtoA":
    a, b = b, a
  return (images.to_channels(tf.cast(a, tf.float32), config.input_nc),
          images.to_channels(tf.cast(b, tf.float32), config.output_nc))


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


def _scaled_width_size(shape, config):
  """The reference's ``__scale_width``: width load_size, height in proportion (int()), at least crop_size."""
  shape = tf.cast(shape, tf.float32)
  height = tf.cast(tf.maximum(shape[0] * config.load_size / shape[1], config.crop_size), tf.int32)
  return height, config.load_size


def _nearest_multiple_size(shape, multiple: int):
  """The reference's ``__make_power_2`` for the network's multiple: each side rounded to the nearest, at least one."""
  sides = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) / multiple), tf.int32) * multiple
  sides = tf.maximum(sides, multiple)
  return sides[0], sides[1]


def _jitter(a, b, config, seed):
  """The reference's train-time transform, identical for A and B.

  ``scale_width`` and ``none`` keep the (scaled) image whole, as the
  reference, resized to the nearest multiple of what the network takes
  (``models.size_multiple``).
  """
  crop, load = config.crop_size, config.load_size
  if config.preprocess == "resize_and_crop":
    a, b = _resize(a, load, load), _resize(b, load, load)
  elif config.preprocess in ("scale_width", "scale_width_and_crop"):
    height, width = _scaled_width_size(tf.shape(a), config)
    a, b = _resize(a, height, width), _resize(b, height, width)
  if config.preprocess in ("scale_width", "none"):
    height, width = _nearest_multiple_size(tf.shape(a), models.size_multiple(config.model))
    a, b = _resize(a, height, width), _resize(b, height, width)
    top, left, flip = jitter_params(crop, crop, config, seed)  # no crop: only the flip is drawn
  else:
    shape = tf.shape(a)
    tf.debugging.assert_greater_equal(
        shape[:2], crop,
        message=f"an image is smaller than config.crop_size={crop} for preprocess={config.preprocess!r}")
    top, left, flip = jitter_params(shape[0], shape[1], config, seed)
    a, b = a[top:top + crop, left:left + crop], b[top:top + crop, left:left + crop]
  return tf.cond(flip, lambda: (a[:, ::-1], b[:, ::-1]), lambda: (a, b))


def eval_transform(a, b, config: ml_collections.ConfigDict):
  """The deterministic part of the training transform, which evaluate and translate apply.

  ``resize_and_crop``: a resize to crop_size x crop_size, as the reference's
  test.py (its test options set load_size to crop_size); ``scale_width`` and
  ``scale_width_and_crop``: width load_size, height in proportion; ``crop`` and
  ``none``: the image's own size. The generator then runs at that size
  (``inference.generate`` pads it to what the network takes). B, if given,
  is resized to A's size where it differs.
  """
  if config.preprocess == "resize_and_crop":
    height, width = config.crop_size, config.crop_size
  elif config.preprocess in ("scale_width", "scale_width_and_crop"):
    height, width = _scaled_width_size(tf.shape(a), config)
  else:
    height, width = tf.shape(a)[0], tf.shape(a)[1]
  same = lambda image: tf.reduce_all(tf.shape(image)[:2] == tf.stack([height, width]))
  fit = lambda image: tf.cond(same(image), lambda: image, lambda: _resize(image, height, width))
  return fit(a), (None if b is None else fit(b))


def to_model_range(a, b, bits: Tuple[int, int], config: ml_collections.ConfigDict):
  """The transformed pair in [-1, 1]: by the files' range, or as the reference's L / 50 - 1 and ab / 110.

  ``bits``: of the model's (input, target) files. In colorization mode ``a``
  is the photo in RGB, and ``b`` is not read.
  """
  if config.dataset_mode == "colorization":
    return colour.to_model(tf.clip_by_value(a / float(2 ** bits[0] - 1), 0.0, 1.0))
  return images.to_unit_range(a, bits[0]), images.to_unit_range(b, bits[1])


def _traced_as_written(function):
  """``function`` for tf.data to trace without autograph, whose conversion costs a start ~1 s.

  Nothing here branches in Python on a tensor (``tf.cond`` does), so there is
  nothing for autograph to convert.
  """
  return tf.autograph.experimental.do_not_convert(function)


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
          .flat_map(_traced_as_written(epoch_positions))
          .skip(first % num)
          .filter(_traced_as_written(mine))
          .map(_traced_as_written(lambda position, epoch, index: (epoch, index))))


def _check_one_size(config: ml_collections.ConfigDict, source: PairSource) -> None:
  """``scale_width`` and ``none`` keep whole images: a batch of several needs them all of one training size."""
  if not source.sizes:
    return
  multiple = models.size_multiple(config.model)
  first = None
  for name, (height, width) in zip(source.filenames, source.sizes):
    shape = (height, width)
    if config.preprocess == "scale_width":
      shape = tuple(int(x) for x in _scaled_width_size(tf.constant([height, width]), config))
    size = tuple(int(x) for x in _nearest_multiple_size(tf.constant(shape), multiple))
    first = first or (name, size)
    if size != first[1]:
      raise ValueError(
          f"config.preprocess={config.preprocess!r} trains on whole images, and config.batch_size="
          f"{config.batch_size} batches images of one size: {source.description}/{first[0]} becomes "
          f"{first[1][0]}x{first[1][1]} but {name} {size[0]}x{size[1]}. Use batch_size=1, images of one "
          "size, or a preprocess that crops.")


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
  bits = source.model_bits(config.direction)
  if config.preprocess in ("scale_width", "none") and local_batch > 1:
    _check_one_size(config, source)

  def load(epoch, index):
    a, b = _decode_pair(*source.read(index), source, config)
    a, b = _jitter(a, b, config, _fold_in(tf.constant([config.seed, 0], tf.int64), epoch, index))
    a, b = to_model_range(a, b, bits, config)
    return {"A": a, "B": b}

  options = tf.data.Options()
  options.deterministic = True
  return (positions.map(_traced_as_written(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .batch(local_batch, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE)
          .with_options(options))


def make_eval_dataset(config: ml_collections.ConfigDict, *, batch_size: Optional[int] = None,
                      split: Optional[str] = None, source: Optional[PairSource] = None) -> tf.data.Dataset:
  """The eval split, no jitter, at ``eval_transform``'s size, in batches of images of one size.

  Each batch holds up to ``batch_size`` (default config.batch_size) images of
  one shape, in the split's order where the sizes allow; ``index`` is each
  image's position in the split (``filename`` its name). ``source``, if given,
  is that split, opened already.
  """
  if source is None:
    source = (pair_source(config, split) if split else
              pair_source(config, config.eval_split, named_by="config.eval_split"))
  filenames = tf.constant(source.filenames)
  bits = source.model_bits(config.direction)
  batch_size = batch_size or config.batch_size

  def load(index):
    a, b = to_model_range(*eval_transform(*_decode_pair(*source.read(index), source, config), config), bits, config)
    return {"A": a, "B": b,
            "filename": tf.gather(filenames, index), "index": index}

  def shape_key(example):
    shape = tf.cast(tf.shape(example["A"]), tf.int64)
    return shape[0] * (1 << 32) + shape[1]

  return (tf.data.Dataset.range(source.num_examples)
          .map(_traced_as_written(load), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
          .group_by_window(_traced_as_written(shape_key),
                           _traced_as_written(lambda _, window: window.batch(batch_size)), window_size=batch_size)
          .prefetch(tf.data.AUTOTUNE))


def shard_for_devices(batch, num_devices: int):
  """Reshapes each [n, ...] array to [num_devices, n // num_devices, ...] for pmap."""
  def reshape(x):
    if x.shape[0] % num_devices:
      raise ValueError(f"A batch of {x.shape[0]} examples cannot be split evenly over "
                       f"{num_devices} devices: use a batch size that is a multiple of {num_devices}.")
    return x.reshape(num_devices, x.shape[0] // num_devices, *x.shape[1:])
  return jax.tree_util.tree_map(reshape, batch)
