"""Edges -> shoes or handbags, as in the paper: ``edges2.py:shoes`` or ``edges2.py:handbags``.

Edges2shoes (UT Zappos50K, ~50k training pairs) and edges2handbags (iGAN,
~137k): 15 epochs, batch 4. Unlike its other datasets, the paper lists no
random jitter or mirroring for the edges datasets (the images are 256x256
already): preprocess "none", no_flip. The paper trains at a constant rate; we
keep the reference's policy (constant, then linear decay to 0) and split the
15 epochs 8 + 7.
"""

from experiments.configs import default

OBJECTS = ("shoes", "handbags")


def get_config(objects: str = "shoes"):
  if objects not in OBJECTS:
    raise ValueError(f"--config experiments/configs/edges2.py:{objects}: the objects after the colon "
                     f"must be one of {OBJECTS}.")
  config = default.get_config()
  config.dataset = f"pix2pix/edges2{objects}"
  config.direction = "AtoB"
  config.eval_split = "val"
  config.preprocess = "none"
  config.no_flip = True
  config.batch_size = 4
  config.optim.n_epochs = 8
  config.optim.n_epochs_decay = 7
  return config
