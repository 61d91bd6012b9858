"""Image files: what each holds, full-precision decoding of 16-bit and N-channel files, channels, encoding."""

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tifffile

from p2p_jax import images


def _write_png(path, samples):
  tf.io.write_file(str(path), tf.io.encode_png(samples))
  return path


def _decoded(path):
  info = images.inspect(path)
  return images.decode(tf.constant(path.read_bytes()), info.bits).numpy(), info


def test_a_16_bit_png_decodes_at_full_precision(tmp_path):
  """Levels 1000 and 1001 stay apart: an 8-bit decode (x // 257) would merge them."""
  samples = np.array([[[1000], [1001]], [[0], [65535]]], np.uint16)
  pixels, info = _decoded(_write_png(tmp_path / "depth.png", samples))
  assert info == images.ImageInfo(2, 2, 1, 16, "PNG")
  np.testing.assert_array_equal(pixels, samples)
  unit = images.to_unit_range(pixels, 16).numpy()
  assert unit[0, 0, 0] != unit[0, 1, 0] and unit.min() == -1 and unit.max() == 1


def test_a_16_bit_rgb_png_keeps_its_three_channels(tmp_path):
  samples = np.random.default_rng(0).integers(0, 65536, (5, 7, 3), np.uint16)
  pixels, info = _decoded(_write_png(tmp_path / "rgb16.png", samples))
  assert (info.channels, info.bits) == (3, 16)
  np.testing.assert_array_equal(pixels, samples)


@pytest.mark.parametrize("layout", ["samples", "pages"])
def test_an_n_channel_tiff_decodes_channels_last(tmp_path, layout):
  bands = np.random.default_rng(1).integers(0, 65536, (6, 9, 5), np.uint16)
  path = tmp_path / "bands.tif"
  if layout == "samples":
    tifffile.imwrite(path, bands, photometric="minisblack", planarconfig="contig")
  else:  # one band per page
    tifffile.imwrite(path, np.moveaxis(bands, -1, 0))
  pixels, info = _decoded(path)
  assert info == images.ImageInfo(9, 6, 5, 16, "TIFF")
  np.testing.assert_array_equal(pixels, bands)


def test_a_float_tiff_is_refused_with_what_is_expected(tmp_path):
  tifffile.imwrite(tmp_path / "float.tif", np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="float32 samples: expected 8- or 16-bit unsigned integers"):
    images.inspect(tmp_path / "float.tif")
  assert isinstance(images.decode_all([tmp_path / "float.tif"])[0], ValueError)


def test_tiff_decodes_inside_a_tf_data_pipeline(tmp_path):
  bands = np.arange(4 * 3 * 4, dtype=np.uint8).reshape(4, 3, 4)
  tifffile.imwrite(tmp_path / "b.tif", bands, photometric="minisblack", planarconfig="contig")
  dataset = tf.data.Dataset.from_tensors(tf.io.read_file(str(tmp_path / "b.tif"))).map(
      lambda encoded: images.decode(encoded, 8))
  np.testing.assert_array_equal(next(dataset.as_numpy_iterator()), bands)


def test_channels_convert_as_the_reference(tmp_path):
  """Grey repeated for RGB, alpha dropped, and RGB to grey as PIL's convert('L') (ITU-R 601)."""
  rgba = np.random.default_rng(2).integers(0, 256, (8, 8, 4), np.uint8)
  as_float = lambda x: tf.constant(x, tf.float32)
  np.testing.assert_array_equal(images.to_channels(as_float(rgba), 3), rgba[..., :3])
  np.testing.assert_array_equal(images.to_channels(as_float(rgba[..., :1]), 3), np.repeat(rgba[..., :1], 3, -1))
  np.testing.assert_array_equal(images.to_channels(as_float(rgba[..., :2]), 1), rgba[..., :1])
  luma = np.asarray(Image.fromarray(rgba[..., :3]).convert("L"), np.float32)[..., None]
  np.testing.assert_allclose(images.to_channels(as_float(rgba[..., :3]), 1), luma, atol=0.5)
  np.testing.assert_array_equal(images.to_channels(as_float(rgba), 4), rgba)


def test_channel_errors_say_what_the_model_takes():
  png, tiff = images.ImageInfo(4, 4, 4, 8, "PNG"), images.ImageInfo(4, 4, 4, 16, "TIFF")
  assert images.channel_error(png, 3) == ""  # RGBA -> RGB, as the reference
  assert images.channel_error(png, 4) == ""
  assert images.channel_error(tiff, 4) == ""
  assert images.channel_error(tiff, 3) == ("it has 4 channels, the model takes 3 (or a JPEG/PNG of 1 to 4, "
                                           "converted as the reference does)")
  assert images.channel_error(images.ImageInfo(4, 4, 1, 8, "PNG"), 2) == "it has 1 channels, the model takes 2"


@pytest.mark.parametrize("channels, bits, suffix", [(1, 16, ".png"), (3, 16, ".png"), (3, 8, ".png"),
                                                    (5, 16, ".tif"), (2, 8, ".tif"), (4, 16, ".tif")])
def test_encode_writes_every_level_and_channel(tmp_path, channels, bits, suffix):
  top = 2 ** bits - 1
  levels = np.random.default_rng(3).integers(0, top + 1, (6, 5, channels))
  unit = levels / (top / 2) - 1.0
  assert images.extension(channels) == suffix
  path = tmp_path / f"out{suffix}"
  path.write_bytes(images.encode(unit, bits))
  pixels, info = _decoded(path)
  assert (info.channels, info.bits) == (channels, bits)
  np.testing.assert_array_equal(pixels, levels)
