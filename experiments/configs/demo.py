"""A CPU-sized run on the embedded synthetic dataset: 64 px, a 6-level U-Net."""

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "synthetic"
  config.load_size = 72
  config.crop_size = 64
  config.batch_size = 4
  config.model.num_downs = 6
  config.model.ngf = 32
  config.model.ndf = 32
  config.optim.n_epochs = 5
  config.optim.n_epochs_decay = 5
  config.log_every_steps = 20
  config.checkpoint_every_steps = 200
  config.sample_every_steps = 100
  return config
