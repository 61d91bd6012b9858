"""Edges -> handbags (iGAN), as in the paper: ~137k training images, 15 epochs, batch 4.

Unlike its other datasets, the paper lists no random jitter or mirroring for
the edges datasets (the images are 256x256 already): preprocess "none", no_flip.
The paper trains at a constant rate; we keep the reference's policy (constant,
then linear decay to 0) and split the 15 epochs 8 + 7.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "pix2pix/edges2handbags"
  config.direction = "AtoB"
  config.eval_split = "val"
  config.preprocess = "none"
  config.no_flip = True
  config.batch_size = 4
  config.optim.n_epochs = 8
  config.optim.n_epochs_decay = 7
  return config
