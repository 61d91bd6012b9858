"""Cityscapes, semantic labels -> photos (the reference's --direction BtoA), as in the paper.

2975 training images, 200 epochs (100 at 2e-4, then 100 decaying linearly to 0),
batch 1; evaluated on the 500 validation images.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "pix2pix/cityscapes"
  config.direction = "BtoA"
  config.eval_split = "val"
  return config
