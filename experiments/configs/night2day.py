"""Day -> night (Transient Attributes webcams), as in the paper: 17823 images, 17 epochs, batch 4.

The archive holds night|day pairs, so the paper's day -> night is the
reference's --direction BtoA (its pretrained model is called day2night). The
paper trains at a constant rate; we keep the reference's policy (constant, then
linear decay to 0) and split the 17 epochs 9 + 8.
"""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "pix2pix/night2day"
  config.direction = "BtoA"
  config.eval_split = "test"
  config.batch_size = 4
  config.optim.n_epochs = 9
  config.optim.n_epochs_decay = 8
  return config
