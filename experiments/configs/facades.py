"""Facades, labels -> photos (the reference's --direction BtoA), as in the paper.

400 training images (CMP Facades), 200 epochs (100 at 2e-4, then 100 decaying
linearly to 0), batch 1, U-Net 256 and the 70x70 PatchGAN.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "pix2pix/facades"
  config.direction = "BtoA"
  config.eval_split = "test"
  return config
