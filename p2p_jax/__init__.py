"""p2p_jax: pix2pix image-to-image translation in JAX/Flax."""

from p2p_jax.train import TrainState, create_train_state, generate, train_step

__all__ = ["TrainState", "create_train_state", "generate", "train_step"]
__version__ = "0.1.0"
