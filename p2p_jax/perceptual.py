"""FID, KID and LPIPS over an eval split: the metrics papers on paired translation report.

FID and KID compare the Inception features of the generated images with
those of the split's targets, the images quantised to 8 bits first, as the
per-image PNGs that evaluate writes are (so FID on those folders, with any
of the field's tools and the same network, gives the same number). LPIPS is
the mean over image pairs of the distance between each output and its
target. A ``Scorer`` accumulates over batches; its real features can be kept
for the next checkpoint of the same split. Grey images are scored as RGB
images of three equal channels; other channel counts are not scored
(``unscorable``).
"""

import dataclasses
import hashlib
from typing import Dict, Iterable, List, Optional

from absl import logging
import numpy as np

from p2p_jax import fid, lpips, summaries

METRICS = ("fid", "kid", "kid_std", "lpips")


@dataclasses.dataclass(frozen=True)
class Weights:
  """The networks' params, or None with the reason in ``missing`` (what to install)."""
  inception: Optional[dict]
  lpips: Optional[dict]
  missing: List[str]


def load_weights() -> Weights:
  """Whichever of the two weight files can be had; what is missing is said, not raised."""
  missing, loaded = [], {}
  for name, module in (("inception", fid), ("lpips", lpips)):
    try:
      loaded[name] = module.load_params()
    except (FileNotFoundError, ValueError) as error:
      loaded[name] = None
      missing.append(str(error))
  return Weights(loaded["inception"], loaded["lpips"], missing)


def unscorable(channels: int) -> str:
  """Why images of ``channels`` channels get no FID, KID or LPIPS ("" if they do)."""
  if channels in (1, 3):
    return ""
  return (f"FID, KID and LPIPS: not computed for images of {channels} channels (their networks take grey "
          "or RGB images)")


def _rgb(images) -> np.ndarray:
  images = np.asarray(images, np.float32)
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def _pad(images: np.ndarray, size: int) -> np.ndarray:
  """Pads a short last batch to ``size``: one shape, one compilation."""
  return np.concatenate([images, np.zeros((size - len(images), *images.shape[1:]), images.dtype)])


class Scorer:
  """FID, KID and LPIPS of the batches given to ``add``; ``results()`` at the end.

  ``real_features``: the targets' Inception features from an earlier pass
  over the same split (``real_features()`` of that scorer), not computed again.
  """

  def __init__(self, weights: Weights, real_features: Optional[np.ndarray] = None, seed: int = 0):
    self.weights, self.seed = weights, seed
    self._known_real = real_features
    self._fake, self._real, self._lpips = [], [], []
    self._batch_size = None

  @property
  def available(self) -> List[str]:
    """The metrics this scorer computes: all of ``METRICS`` when both weight files were found."""
    return (["fid", "kid", "kid_std"] if self.weights.inception is not None else []) + (
        ["lpips"] if self.weights.lpips is not None else [])

  @property
  def needs_real_features(self) -> bool:
    return self.weights.inception is not None and self._known_real is None and not self._real

  def with_real_features(self, real_features: np.ndarray) -> "Scorer":
    """This scorer, but with the split's real features given (e.g. from a cache), not computed."""
    return Scorer(self.weights, real_features, self.seed)

  def fresh(self) -> "Scorer":
    """A scorer for another checkpoint on the same split: same weights, real features kept."""
    return Scorer(self.weights, self.real_features() if self.weights.inception is not None else None, self.seed)

  def add(self, generated, target) -> None:
    """One batch of generated images and their targets, NHWC in [-1, 1], grey or RGB."""
    n = len(generated)
    self._batch_size = max(self._batch_size or 0, n)
    generated, target = _rgb(generated), _rgb(target)
    if self.weights.inception is not None:
      fake = summaries.to_uint8(generated)
      self._fake.append(np.asarray(fid.features(self.weights.inception, _pad(fake, self._batch_size)))[:n])
      if self._known_real is None:
        real = summaries.to_uint8(target)
        self._real.append(np.asarray(fid.features(self.weights.inception, _pad(real, self._batch_size)))[:n])
    if self.weights.lpips is not None:
      a, b = (_pad(np.asarray(x, np.float32), self._batch_size) for x in (generated, target))
      self._lpips.append(np.asarray(lpips.distance(self.weights.lpips, a, b))[:n])

  def real_features(self) -> np.ndarray:
    return self._known_real if self._known_real is not None else np.concatenate(self._real)

  def results(self) -> Dict[str, float]:
    """``fid``, ``kid`` (mean over subsets), ``kid_std`` and ``lpips``: those whose weights were found."""
    out = {}
    if self.weights.inception is not None and self._fake:
      fake, real = np.concatenate(self._fake), self.real_features()
      if len(fake) != len(real):
        raise ValueError(f"{len(fake)} generated images against {len(real)} real features: the real "
                         "features kept are of another split.")
      out["fid"] = fid.fid(fake, real)
      if len(fake) >= 2:
        out["kid"], out["kid_std"] = fid.kernel_distance(fake, real, seed=self.seed)
    if self.weights.lpips is not None and self._lpips:
      out["lpips"] = float(np.mean(np.concatenate(self._lpips)))
    return out


def real_features_key(encoded_files: Iterable[bytes], settings: str) -> str:
  """What the real features of a split depend on, hashed: the files' bytes, the weights, and ``settings``.

  ``settings`` says how the files become the targets (size, direction, channels).
  """
  digest = hashlib.sha256(f"{fid.WEIGHTS_SHA1} {settings}".encode())
  for data in encoded_files:
    digest.update(hashlib.sha256(data).digest())
  return digest.hexdigest()[:32]


def warn_missing(weights: Weights) -> None:
  for message in weights.missing:
    logging.warning("%s; reporting the other metrics.", message)

