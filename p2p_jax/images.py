"""Image files: which files are images, what each holds, decoding them at full precision.

The input pipeline (training and eval splits) and inference (``translate``)
list and check files here, so a file that does not decode is named before a
run trains or writes anything, whichever command reads it. JPEG and PNG decode
in TensorFlow (8- or 16-bit, 1 to 4 channels); TIFF (8- or 16-bit, any number
of channels as samples or pages) through ``tifffile``.

Channels follow the reference: a JPEG or PNG (grey, grey + alpha, RGB, RGBA)
becomes RGB for a 3-channel model (grey repeated, alpha dropped) and its
ITU-R 601 luma for a 1-channel one. A TIFF, whose channels may be any bands,
and any file for a model of another channel count N, must hold exactly the
model's channels.
"""

import concurrent.futures
import io
import os
import pathlib
from typing import List, NamedTuple, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError
import tensorflow as tf
import tifffile

from p2p_jax import cache

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
CONVERTIBLE_CHANNELS = (1, 2, 3, 4)  # grey, grey + alpha, RGB, RGBA
# PIL's and tifffile's errors for files that are not images or are damaged.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, tifffile.TiffFileError)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # IHDR colour type -> channels
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, PIL's convert("L") and so the reference's grey


class ImageInfo(NamedTuple):
  """What a file holds: its size, channels, bits per sample (8 or 16) and format (PIL's name)."""
  width: int
  height: int
  channels: int
  bits: int
  format: str


def image_files(folder: pathlib.Path) -> List[pathlib.Path]:
  """The image files directly in ``folder``, sorted by name."""
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def decode_tiff(encoded: bytes) -> np.ndarray:
  """An 8- or 16-bit TIFF as [H, W, C]: samples, planes or pages become channels."""
  with tifffile.TiffFile(io.BytesIO(encoded)) as tif:
    series = tif.series[0]
    array, axes = series.asarray(), series.axes
  if array.ndim == 2:
    array = array[..., None]
  elif array.ndim == 3 and not axes.endswith("S"):  # planar samples or pages first
    array = np.moveaxis(array, 0, -1)
  elif array.ndim != 3:
    raise ValueError(f"a TIFF of axes {axes!r} and shape {array.shape}: expected one image of H x W "
                     "pixels with any number of channels (samples or pages)")
  if array.dtype not in (np.uint8, np.uint16):
    raise ValueError(f"a TIFF of {array.dtype} samples: expected 8- or 16-bit unsigned integers")
  return np.ascontiguousarray(array)


@tf.autograph.experimental.do_not_convert
def _decode_tiff_tensor(encoded) -> np.ndarray:
  return decode_tiff(encoded.item() if isinstance(encoded, np.ndarray) else encoded)


def _png_header(path: pathlib.Path) -> ImageInfo:
  with path.open("rb") as file:
    header = file.read(26)
  width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
  return ImageInfo(width, height, _PNG_CHANNELS.get(header[25], 3), 16 if header[24] == 16 else 8, "PNG")


def inspect(path: pathlib.Path) -> ImageInfo:
  """What ``path`` holds, after decoding the whole file, so a truncated one fails here.

  JPEGs decode at 1/8 scale (DCT scaling still reads every byte), about the
  cost of two header reads.
  """
  path = pathlib.Path(path)
  if path.suffix.lower() in TIFF_EXTENSIONS:
    array = decode_tiff(path.read_bytes())
    return ImageInfo(array.shape[1], array.shape[0], array.shape[2], array.dtype.itemsize * 8, "TIFF")
  with Image.open(path) as image:
    width, height = image.size
    mode = image.mode
    if image.format == "JPEG":
      image.draft(mode, (width // 8, height // 8))
    image.load()
  if image.format == "PNG":
    return _png_header(path)
  return ImageInfo(width, height, Image.getmodebands(mode) if mode != "P" else 3,
                   16 if mode.startswith("I;16") else 8, image.format)


def decode_all(paths: Sequence[pathlib.Path]) -> List[Union[ImageInfo, Exception]]:
  """Each file's ``ImageInfo``, or the error its decoding raised; decoded in parallel.

  A file that its folder's scan (``cache.read_scan``) records as it is now
  is not decoded again; the files decoded here that succeed are recorded.
  """
  def inspect_or_error(path):
    try:
      return inspect(path)
    except DECODE_ERRORS as error:
      return error

  scans = {folder: cache.read_scan(folder) for folder in {path.parent for path in paths}}
  results, stats, todo = [None] * len(paths), [None] * len(paths), []
  for i, path in enumerate(paths):
    try:
      stats[i] = cache.stat_record(path)
    except OSError:  # inspect says what is wrong with it.
      todo.append(i)
      continue
    stat, info = scans[path.parent].get(path.name, (None, None))
    if stat == stats[i]:
      results[i] = ImageInfo(*info)
    else:
      todo.append(i)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL.
    decoded = list(pool.map(inspect_or_error, [paths[i] for i in todo]))
  changed = set()
  for i, info in zip(todo, decoded):
    results[i] = info
    if isinstance(info, ImageInfo) and stats[i] is not None:
      scans[paths[i].parent][paths[i].name] = (stats[i], tuple(info))
      changed.add(paths[i].parent)
  for folder in changed:
    cache.write_scan(folder, scans[folder])
  return results


def channel_error(info: ImageInfo, channels: int) -> str:
  """Why an image of ``info`` cannot feed a ``channels``-channel side of the model ("" if it can)."""
  convertible = channels in (1, 3) and info.format != "TIFF"
  if info.channels == channels or (convertible and info.channels in CONVERTIBLE_CHANNELS):
    return ""
  also = " (or a JPEG/PNG of 1 to 4, converted as the reference does)" if channels in (1, 3) else ""
  return f"it has {info.channels} channels, the model takes {channels}{also}"


def decode(encoded: tf.Tensor, bits: int) -> tf.Tensor:
  """An encoded JPEG, PNG or TIFF as [H, W, C] uint8 (``bits=8``) or uint16 (16), at full precision."""
  dtype = tf.uint16 if bits == 16 else tf.uint8
  magic = tf.strings.substr(encoded, 0, 4)
  is_tiff = tf.logical_or(tf.equal(magic, _TIFF_MAGIC[0]), tf.equal(magic, _TIFF_MAGIC[1]))

  def tiff():
    image = tf.numpy_function(_decode_tiff_tensor, [encoded], dtype, stateful=False)
    return tf.ensure_shape(image, [None, None, None])

  return tf.cond(is_tiff, tiff, lambda: tf.io.decode_image(encoded, channels=0, dtype=dtype,
                                                            expand_animations=False))


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """``image`` (float, [H, W, C]) with the model's ``channels``; C was checked by ``channel_error``."""
  if channels not in (1, 3):
    return tf.ensure_shape(image, [None, None, channels])
  count = tf.shape(image)[-1]
  grey = lambda: image[..., :1]
  luma = lambda: tf.reduce_sum(image[..., :3] * tf.constant(_LUMA, image.dtype), -1, keepdims=True)
  if channels == 1:
    result = tf.cond(count < 3, grey, luma)
  else:
    result = tf.cond(count < 3, lambda: tf.repeat(image[..., :1], 3, axis=-1), lambda: image[..., :3])
  return tf.ensure_shape(result, [None, None, channels])


def to_unit_range(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Samples of a ``bits``-bit file (after any resize) as float32 in [-1, 1], by the file's range."""
  top = float(2 ** bits - 1)
  return tf.clip_by_value(tf.cast(image, tf.float32), 0.0, top) / (top / 2) - 1.0


def read(path, channels: int, info: ImageInfo) -> np.ndarray:
  """The image at ``path`` (of ``info``, from ``inspect``) as float32 [H, W, channels] in its file's range."""
  pixels = decode(tf.constant(pathlib.Path(path).read_bytes()), info.bits)
  return to_channels(tf.cast(pixels, tf.float32), channels).numpy()


def quantize(pixels, bits: int) -> np.ndarray:
  """Images in [-1, 1] as ``bits``-bit samples (uint8 or uint16), rounded to the nearest level."""
  top = 2 ** bits - 1
  scaled = np.round((np.clip(np.asarray(pixels, np.float32), -1, 1) + 1) * (top / 2))
  return scaled.astype(np.uint16 if bits == 16 else np.uint8)


def extension(channels: int) -> str:
  """What an image of ``channels`` is written as: grey and RGB as PNG, other counts (bands) as TIFF."""
  return ".png" if channels in (1, 3) else ".tif"


def encode(pixels, bits: int) -> bytes:
  """An [H, W, C] image in [-1, 1] as the bytes of a ``bits``-bit file of type ``extension(C)``."""
  samples = quantize(pixels, bits)
  if extension(samples.shape[-1]) == ".png":
    return tf.io.encode_png(samples).numpy()
  buffer = io.BytesIO()
  tifffile.imwrite(buffer, samples, photometric="minisblack", planarconfig="contig")
  return buffer.getvalue()
