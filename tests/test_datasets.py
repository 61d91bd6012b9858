"""The TFDS builder, offline: an archive in the official layout in the manual dir."""

import hashlib
import io
import re
import tarfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from p2p_jax import input_pipeline
from p2p_jax.datasets import pix2pix, synthetic
from tests.conftest import tiny_config


def _add_image(tar, name, image):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, "JPEG", quality=95)
  info = tarfile.TarInfo(name)
  info.size = buffer.tell()
  buffer.seek(0)
  tar.addfile(info, buffer)


def _archive(data_dir, splits, monkeypatch, shape=(24, 48)):
  """facades.tar.gz in the manual dir, with its checksum recorded as the official one's."""
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  path = manual / "facades.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for split, count in splits.items():
      for i in range(count):
        pair = np.zeros((*shape, 3), np.uint8)
        pair[:, : shape[1] // 2] = 40 * i  # A
        pair[:, shape[1] // 2:] = 250  # B
        _add_image(tar, f"facades/{split}/{i + 1}.jpg", pair)
  checksum = (hashlib.md5(path.read_bytes()).hexdigest(), path.stat().st_size)
  monkeypatch.setitem(pix2pix.ARCHIVE_CHECKSUMS, "facades", checksum)
  return path


def _config(data_dir):
  config = tiny_config()
  config.dataset = "pix2pix/facades"
  config.data_dir = str(data_dir)
  return config


def test_builder_prepares_the_archive_splits_offline(tmp_path, monkeypatch):
  _archive(tmp_path, {"train": 3, "val": 1, "test": 2}, monkeypatch)
  config = _config(tmp_path)
  assert input_pipeline.num_examples(config, "train") == 3
  assert input_pipeline.num_examples(config, "val") == 1
  batch = next(input_pipeline.make_eval_dataset(config, batch_size=2).as_numpy_iterator())
  assert [f.decode() for f in batch["filename"]] == ["1.jpg", "2.jpg"]
  np.testing.assert_allclose(batch["B"], 250 / 127.5 - 1, atol=0.03)
  np.testing.assert_allclose(batch["A"][1], 40 / 127.5 - 1, atol=0.03)
  assert next(input_pipeline.make_train_dataset(config).as_numpy_iterator())["A"].shape == (2, 32, 32, 3)
  with pytest.raises(ValueError, match=r"split='validation': dataset pix2pix/facades has no such split; it has \['test', 'train', 'val'\]"):
    input_pipeline.num_examples(config, "validation")


def test_builder_names_a_file_that_is_not_a_pair(tmp_path, monkeypatch):
  _archive(tmp_path, {"train": 1}, monkeypatch, shape=(30, 30))
  with pytest.raises(RuntimeError, match=r"facades/train/1.jpg is 30x30 \(width x height\): not an A\|B pair"):
    input_pipeline.num_examples(_config(tmp_path), "train")


def test_an_archive_that_is_not_the_official_one_is_named_and_kept(tmp_path, monkeypatch):
  archive = _archive(tmp_path, {"train": 1}, monkeypatch)
  md5, size = pix2pix.ARCHIVE_CHECKSUMS["facades"]
  monkeypatch.setitem(pix2pix.ARCHIVE_CHECKSUMS, "facades", (md5, size + 1))
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=(
      rf"{archive} is {size} bytes, but the official facades.tar.gz is {size + 1} .*"
      r"Delete it and run again .*config.verify_checksums=False")):
    input_pipeline.num_examples(_config(tmp_path), "train")
  monkeypatch.setitem(pix2pix.ARCHIVE_CHECKSUMS, "facades", ("0" * 32, None))
  with pytest.raises(input_pipeline.DatasetUnavailableError,
                     match=rf"{archive} has MD5 {md5}, but the official facades.tar.gz has 0{{32}}"):
    input_pipeline.num_examples(_config(tmp_path), "train")
  assert archive.exists(), "the user's archive is never deleted"
  config = _config(tmp_path)
  config.verify_checksums = False
  assert input_pipeline.num_examples(config, "train") == 1


def test_every_archive_has_a_recorded_md5():
  assert set(pix2pix.ARCHIVE_CHECKSUMS) == set(pix2pix.DATASETS)
  for name, (md5, size) in pix2pix.ARCHIVE_CHECKSUMS.items():
    assert re.fullmatch(r"[0-9a-f]{32}", md5), f"{name}: {md5!r} is no MD5 hex digest"
    assert size is None or (isinstance(size, int) and size > 0), name


def test_unknown_pix2pix_dataset_is_named(tmp_path):
  config = _config(tmp_path)
  config.dataset = "pix2pix/horses"
  with pytest.raises(ValueError, match=r"no such pix2pix dataset; known: \['pix2pix/facades'"):
    input_pipeline.num_examples(config, "train")
  assert set(pix2pix.DATASETS) == {"facades", "cityscapes", "maps", "edges2shoes", "edges2handbags", "night2day"}


def test_no_network_and_no_archive_says_where_to_put_it(tmp_path, monkeypatch):
  def offline(self, url):
    raise ConnectionError(f"no network for {url}")

  monkeypatch.setattr(tfds.download.DownloadManager, "download", offline)
  with pytest.raises(input_pipeline.DatasetUnavailableError, match=(
      r"(?s)Could not prepare pix2pix/facades .*no network for http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/"
      rf"facades.tar.gz.*put facades.tar.gz .* into {tmp_path}/downloads/manual")):
    input_pipeline.num_examples(_config(tmp_path), "train")


def test_synthetic_pairs_are_a_deterministic_function_of_the_seed(tmp_path):
  first = synthetic.ensure_dataset(tmp_path / "a", seed=3)
  again = synthetic.ensure_dataset(tmp_path / "b", seed=3)
  assert synthetic.ensure_dataset(tmp_path / "a", seed=3) == first  # made once, then reused
  names = sorted(p.name for p in (first / "train").iterdir())
  assert len(names) == synthetic.SPLITS["train"]
  assert (first / "train" / names[0]).read_bytes() == (again / "train" / names[0]).read_bytes()
  other = synthetic.ensure_dataset(tmp_path / "a", seed=4)
  assert (other / "train" / names[0]).read_bytes() != (first / "train" / names[0]).read_bytes()


def test_builder_gives_b_the_odd_column_as_the_reference(tmp_path, monkeypatch):
  """The reference's B is AB.crop((w // 2, 0, w, h)): one column wider than A for an odd width."""
  _archive(tmp_path, {"train": 1}, monkeypatch, shape=(24, 49))
  builder = tfds.builder("pix2pix/facades", data_dir=str(tmp_path))
  builder.download_and_prepare(file_format="array_record")
  example = builder.as_data_source("train")[0]
  assert example["A"].shape == (24, 24, 3) and example["B"].shape == (24, 25, 3)
