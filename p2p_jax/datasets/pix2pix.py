"""TFDS builder for the paper's datasets, from the official pix2pix archives.

``tfds.builder("pix2pix/facades")`` downloads ``facades.tar.gz`` from the
authors' site, or takes it from the manual dir (``<data_dir>/downloads/manual``)
on a machine with no network, and keeps the archive's own splits. Each archive
holds ``<name>/<split>/*.jpg`` with A|B side by side; the builder splits them
into features ``A`` and ``B`` and keeps the ``filename``.

The archives' checksums are not recorded here yet: they could not be fetched
from this offline machine, and an invented checksum is worse than none.
"""

import pathlib

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

URL = "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/{name}.tar.gz"
DATASETS = {
    "facades": "Architectural labels <-> photos (CMP Facades), 400 train / 100 val / 106 test.",
    "cityscapes": "Semantic labels <-> photos (Cityscapes), 2975 train / 500 val.",
    "maps": "Google Maps: aerial photos <-> maps, 1096 train / 1098 val.",
    "edges2shoes": "HED edges -> shoe photos (UT Zappos50K), 49825 train / 200 val.",
    "edges2handbags": "HED edges -> handbag photos (iGAN), 138567 train / 200 val.",
    "night2day": "Night -> day photos (Transient Attributes), 17823 train / 2287 val / 2159 test.",
}
SPLITS = ("train", "val", "test")
# A side-by-side A|B pair is at least about twice as wide as high (its halves may
# be wider than high, as in people2outline); a single photo, even 16:9, is not.
PAIR_MIN_ASPECT = 1.9


def not_a_pair_error(path, width: int, height: int) -> ValueError:
  return ValueError(
      f"{path} is {width}x{height} (width x height): not an A|B pair. A pair is one image at least "
      "about twice as wide as high, A on the left half and B on the right (the layout of the pix2pix "
      "archives and of the reference's combine_A_and_B.py); for separate images use "
      "<split>/A and <split>/B folders with matching file names.")


class Pix2pix(tfds.core.GeneratorBasedBuilder):
  """The paired datasets of Isola et al., CVPR 2017, in the pix2pix archive layout."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=text) for name, text in DATASETS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "With no network, put the official archive (e.g. facades.tar.gz from "
      "http://efrosgans.eecs.berkeley.edu/pix2pix/datasets/) in the manual dir, "
      "<data_dir>/downloads/manual/ by default.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "A": tfds.features.Image(shape=(None, None, 3)),
            "B": tfds.features.Image(shape=(None, None, 3)),
            "filename": tfds.features.Text(),
        }),
        supervised_keys=("A", "B"),
        homepage="https://phillipi.github.io/pix2pix/",
        citation="""@inproceedings{isola2017image,
  title={Image-to-Image Translation with Conditional Adversarial Networks},
  author={Isola, Phillip and Zhu, Jun-Yan and Zhou, Tinghui and Efros, Alexei A},
  booktitle={CVPR}, year={2017}}""")

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name = self.builder_config.name
    try:
      archive = dl_manager.manual_dir / f"{name}.tar.gz"
    except AssertionError:  # No manual dir, or an empty one.
      archive = None
    if archive is None or not archive.exists():
      archive = dl_manager.download(URL.format(name=name))
    root = pathlib.Path(dl_manager.extract(archive)) / name
    splits = {split: self._generate_examples(root / split) for split in SPLITS if (root / split).is_dir()}
    if not splits:
      raise ValueError(f"The archive {archive} has none of the folders {name}/{{{','.join(SPLITS)}}}.")
    return splits

  def _generate_examples(self, split_dir: pathlib.Path):
    for path in sorted(split_dir.glob("*.jpg")):
      with Image.open(path) as image:
        pair = np.asarray(image.convert("RGB"))
      height, width = pair.shape[:2]
      if width < PAIR_MIN_ASPECT * height:
        raise not_a_pair_error(path, width, height)
      half = width // 2
      yield path.name, {"A": pair[:, :half], "B": pair[:, half:2 * half], "filename": path.name}
