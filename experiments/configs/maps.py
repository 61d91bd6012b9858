"""Google Maps, both directions, as in the paper: 1096 training images, 200 epochs, batch 1.

The direction is the config argument: ``--config experiments/configs/maps.py``
or ``...maps.py:AtoB`` translates aerial photos to maps, ``...maps.py:BtoA``
maps to aerial photos. Evaluated on the 1098 validation images.
"""

from experiments.configs import default
from p2p_jax import configuration


def get_config(direction: str = "AtoB"):
  if direction not in configuration.DIRECTIONS:
    raise ValueError(f"--config experiments/configs/maps.py:{direction}: the direction after the "
                     f"colon must be one of {configuration.DIRECTIONS}.")
  config = default.get_config()
  config.dataset = "pix2pix/maps"
  config.direction = direction
  config.eval_split = "val"
  return config
