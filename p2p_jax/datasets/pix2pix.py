"""TFDS builder for the paper's datasets, from the official pix2pix archives.

``tfds.builder("pix2pix/facades")`` downloads ``facades.tar.gz`` from the
authors' site, or takes it from the manual dir (``<data_dir>/downloads/manual``)
on a machine with no network, and keeps the archive's own splits. Each archive
holds ``<name>/<split>/*.jpg`` with A|B side by side; the builder splits them
into features ``A`` and ``B`` and keeps the ``filename``.

Each archive is checked against the size and MD5 sum recorded below before it
is read (``verify_checksums=False`` skips that, for an archive you trust).
"""

import hashlib
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
# (MD5, size in bytes or None) of each official archive. The authors publish no
# checksums; these are the ones recorded in public code that downloads them:
# MD5s in TheProjectsGuy/MLHub (src/mlhub/pix2pix/data.py), sizes in
# JONGGON/Tensorflow_Advanced_Tutorials (its pix2pix Dataset.py), which wget
# logs of efrosgans.eecs.berkeley.edu agree with.
ARCHIVE_CHECKSUMS = {
    "facades": ("e2e25dd517e9d15828416ab329da2854", 30168306),
    "cityscapes": ("32569df708076e427e9cd02abbca7748", 103441232),
    "maps": ("e5f65d26eb288457f5ac056deb94d154", 250242400),
    "edges2shoes": ("71da478b54fedde126e234a2a050bc15", None),
    "edges2handbags": ("815592f22fa7f7534a286a25bb73bf03", None),
    "night2day": ("fd21b1d447a1f927fed41aabedd85baa", None),
}
SPLITS = ("train", "val", "test")
# A side-by-side A|B pair is at least about twice as wide as high (its halves may
# be wider than high, as in people2outline); a single photo, even 16:9, is not.
PAIR_MIN_ASPECT = 1.9


def verify_archive(path, name: str) -> None:
  """Raises a ValueError naming ``path`` unless it has the official archive's size and MD5."""
  path = pathlib.Path(path)
  expected_md5, expected_size = ARCHIVE_CHECKSUMS[name]
  size = path.stat().st_size
  if expected_size is not None and size != expected_size:
    actual = f"is {size} bytes, but the official {name}.tar.gz is {expected_size}"
  else:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        md5.update(block)
    if md5.hexdigest() == expected_md5:
      return
    actual = f"has MD5 {md5.hexdigest()}, but the official {name}.tar.gz has {expected_md5}"
  raise ValueError(
      f"{path} {actual} (p2p_jax/datasets/pix2pix.py, ARCHIVE_CHECKSUMS): the download is "
      "incomplete or corrupt, or the authors changed the archive. Delete it and run again to "
      "download it anew, or set config.verify_checksums=False to use it as it is.")


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

  def __init__(self, *, verify_checksums: bool = True, **kwargs):
    self._verify_checksums = verify_checksums
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    name = self.builder_config.name
    try:
      archive = dl_manager.manual_dir / f"{name}.tar.gz"
    except AssertionError:  # No manual dir, or an empty one.
      archive = None
    if archive is None or not archive.exists():
      archive = dl_manager.download(URL.format(name=name))
    if self._verify_checksums:
      verify_archive(archive, name)
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
      half = width // 2  # B takes the odd column, as the reference's AB.crop((w2, 0, w, h)).
      yield path.name, {"A": pair[:, :half], "B": pair[:, half:], "filename": path.name}
