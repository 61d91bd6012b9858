"""An embedded paired dataset: label maps -> rendered scenes, made from a seed.

It lets a machine with no network train, test and demo p2p_jax. Each pair is a
label map of a few shapes in flat class colours (A, like facades' labels) and a
"rendering" of it (B): per-class materials with texture, a light gradient, dark
outlines and drop shadows. B is a fixed function of A, so the mapping is
learnable, and there is more to learn than a colour lookup.
"""

import os
import pathlib
import shutil
import tempfile

import numpy as np
from PIL import Image

from p2p_jax import cache

VERSION = "v1"
SIZE = 128
SPLITS = {"train": 256, "test": 32}

# Class 0 is the background; the rest are the shapes' classes.
LABEL_COLOURS = np.array([[0, 0, 170], [230, 40, 40], [40, 200, 60], [250, 220, 30], [30, 200, 230],
                          [200, 60, 220]], np.float32)
MATERIAL_COLOURS = np.array([[200, 190, 170], [150, 60, 40], [60, 120, 50], [220, 180, 90],
                             [70, 110, 170], [120, 80, 140]], np.float32)


def _label_map(rng: np.random.Generator) -> np.ndarray:
  yy, xx = np.mgrid[0:SIZE, 0:SIZE]
  labels = np.zeros((SIZE, SIZE), np.int32)
  for _ in range(rng.integers(3, 7)):
    cls = rng.integers(1, len(LABEL_COLOURS))
    cy, cx = rng.integers(8, SIZE - 8, size=2)
    ry, rx = rng.integers(8, SIZE // 3, size=2)
    shape = rng.integers(3)
    if shape == 0:  # rectangle
      mask = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
    elif shape == 1:  # ellipse
      mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    else:  # triangle pointing up
      mask = (yy <= cy + ry) & (yy >= cy - ry) & (abs(xx - cx) <= (yy - cy + ry) * rx / (2 * ry))
    labels[mask] = cls
  return labels


def render(labels: np.ndarray) -> np.ndarray:
  """The deterministic 'rendering' of a label map (the B side)."""
  yy, xx = np.mgrid[0:labels.shape[0], 0:labels.shape[1]].astype(np.float32)
  image = MATERIAL_COLOURS[labels]
  # Textures differ per class: stripes, checks, dots, waves.
  texture = np.stack([
      np.zeros_like(yy),
      8 * np.sign(np.sin(xx / 2.0)),
      8 * np.sign(np.sin(xx / 4.0) * np.sin(yy / 4.0)),
      10 * (np.hypot((xx % 8) - 4, (yy % 8) - 4) < 2),
      6 * np.sin((xx + yy) / 3.0),
      -8 * ((xx.astype(int) // 6 + yy.astype(int) // 6) % 2),
  ])
  image += np.take_along_axis(texture, labels[None], 0)[0][..., None]
  # Light from the top left.
  image *= (1.15 - 0.3 * (xx + yy) / (2 * labels.shape[0]))[..., None]
  # Drop shadow: background pixels below-right of an object get darker.
  shifted = np.zeros_like(labels)
  shifted[3:, 3:] = labels[:-3, :-3]
  image[(labels == 0) & (shifted > 0)] *= 0.55
  # Dark outlines where the class changes.
  edges = np.zeros(labels.shape, bool)
  edges[1:, :] |= labels[1:, :] != labels[:-1, :]
  edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
  image[edges] *= 0.25
  return np.clip(image, 0, 255).astype(np.uint8)


def make_pair(rng: np.random.Generator) -> np.ndarray:
  """One A|B pair, side by side as in the pix2pix archives."""
  labels = _label_map(rng)
  return np.concatenate([LABEL_COLOURS[labels].astype(np.uint8), render(labels)], axis=1)


def ensure_dataset(root="", seed: int = 0) -> pathlib.Path:
  """Returns the dataset folder (pix2pix layout), generating it on first use.

  Generation goes to a temporary folder that is renamed into place, so two
  processes starting at once both end up with one complete dataset.
  """
  root = pathlib.Path(root) if root else cache.default_root()
  target = root / f"synthetic-{VERSION}-seed{seed}"
  if target.is_dir():
    return target
  root.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=".synthetic-", dir=root))
  try:
    for split_index, (split, count) in enumerate(SPLITS.items()):
      rng = np.random.default_rng([seed, split_index])
      (staging / split).mkdir()
      for i in range(count):
        Image.fromarray(make_pair(rng)).save(staging / split / f"{i:04d}.jpg", quality=95)
    os.rename(staging, target)
  except OSError:
    if not target.is_dir():
      raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target
