"""CIE Lab for colorization: skimage's values (sRGB, D65), and the round trip."""

import numpy as np
import pytest

from p2p_jax import colour

# skimage.color.rgb2lab of sRGB primaries and greys (its documented D65 / 2 degree values).
KNOWN = [((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
         ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
         ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
         ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
         ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0))]


@pytest.mark.parametrize("rgb, lab", KNOWN)
def test_rgb_to_lab_gives_skimages_values(rgb, lab):
  np.testing.assert_allclose(colour.rgb_to_lab(np.asarray(rgb, np.float32)), lab, atol=0.01)


def test_lab_to_rgb_inverts_rgb_to_lab():
  rgb = np.random.default_rng(0).uniform(0, 1, (64, 64, 3)).astype(np.float32)
  np.testing.assert_allclose(colour.lab_to_rgb(colour.rgb_to_lab(rgb)), rgb, atol=1e-4)


def test_the_models_units_are_the_references():
  """L / 50 - 1 and ab / 110 (models/colorization_model.py, data/colorization_dataset.py)."""
  l, ab = colour.to_model(np.asarray([[1.0, 0.0, 0.0]], np.float32))
  np.testing.assert_allclose(l, [[53.2408 / 50 - 1]], atol=1e-4)
  np.testing.assert_allclose(ab, [[80.0925 / 110, 67.2032 / 110]], atol=1e-4)
  np.testing.assert_allclose(colour.to_rgb(l, ab), [[1.0, -1.0, -1.0]], atol=1e-3)
