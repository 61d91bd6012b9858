"""The paper's and the reference's pix2pix settings (facades, 256 px, batch 1).

Every key and its meaning: ``p2p_jax.configuration.default_config``.
"""

from p2p_jax import configuration


def get_config():
  return configuration.default_config()
