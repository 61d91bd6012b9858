"""Image files: which files are images, decoding each once to find the bad ones, reading one.

The input pipeline (training and eval splits) and inference (``translate``)
list and check files here, so a file that does not decode is named before a
run trains or writes anything, whichever command reads it.
"""

import concurrent.futures
import os
import pathlib
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# PIL's errors for files that are not images or are damaged.
DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError)


def image_files(folder: pathlib.Path) -> List[pathlib.Path]:
  """The image files directly in ``folder``, sorted by name."""
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def decoded_size(path: pathlib.Path) -> Tuple[int, int]:
  """(width, height) after decoding the whole file, so a truncated one fails here.

  JPEGs decode at 1/8 scale (DCT scaling still reads every byte), about the
  cost of two header reads.
  """
  with Image.open(path) as image:
    width, height = image.size
    image.draft("RGB", (width // 8, height // 8))
    image.load()
  return width, height


def decode_all(paths: Sequence[pathlib.Path]) -> List[Union[Tuple[int, int], Exception]]:
  """Each file's (width, height), or the error its decoding raised; decoded in parallel."""
  def inspect(path):
    try:
      return decoded_size(path)
    except DECODE_ERRORS as error:
      return error

  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL.
    return list(pool.map(inspect, paths))


def decode_errors(paths: Sequence[pathlib.Path]) -> Dict[pathlib.Path, Exception]:
  """The files among ``paths`` that do not decode, with their errors."""
  return {path: size for path, size in zip(paths, decode_all(paths)) if isinstance(size, Exception)}


def read_rgb(path) -> Image.Image:
  """The image at ``path`` as 8-bit RGB; a ValueError names a file that does not decode."""
  try:
    with Image.open(path) as image:
      if image.mode.startswith("I;16"):  # 16-bit grey (e.g. depth maps): scale, do not clip.
        grey = np.round(np.asarray(image, np.float32) / 257.0).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
      return image.convert("RGB")
  except DECODE_ERRORS as error:
    raise ValueError(f"Cannot read image {path}: {error}") from None
