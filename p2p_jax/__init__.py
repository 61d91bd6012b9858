"""p2p_jax: pix2pix image-to-image translation (Isola et al., CVPR 2017) in JAX/Flax.

What a user needs is here, each with its own docstring:

- ``Pix2Pix``: the networks, optimisers and losses that are trained; from
  Python objects, or ``Pix2Pix.from_config(config, steps_per_epoch=...)``.
- ``LossInputs``: what a generator loss term sees.
- ``TrainState``, ``create_train_state``, ``train_step``, ``train_steps``,
  ``generate``: the pure step and its state.
- ``default_config``: the reference recipe's settings; ``check_config`` names a
  bad value before anything runs.
- ``train_and_evaluate``: the training loop (data-parallel over every device
  and host, resumable, checkpointed), with networks from a config or given.
- ``load_state``: a run's ``TrainState``; ``translate_paths``,
  ``evaluate_checkpoint`` and ``evaluate_checkpoints``: what
  ``experiments.translate`` / ``evaluate`` do.
- ``load_generator``: a run's generator alone, a callable on arrays;
  ``export_generator``: what ``experiments.export`` does (ONNX, SavedModel,
  StableHLO).
- Modules: ``export``, ``input_pipeline``, ``models``, ``layers``, ``losses``, ``metrics``,
  ``perceptual`` (FID, KID, LPIPS over a split; networks in ``fid`` and ``lpips``),
  ``checkpoint`` (and its ``DamagedCheckpointError``, ``CheckpointSaveError``),
  ``locking`` (``WorkdirInUseError``), ``summaries``, ``runtime``, ``cache``,
  ``tuning`` (the convolution formulations "auto" measured on this machine).

Importing p2p_jax applies its XLA:CPU settings (``runtime.configure``; set
``P2P_JAX_CPU_TUNING=0`` to keep JAX's defaults) and keeps compiled programs
for the next process (``cache``; ``P2P_JAX_CACHE_DIR=off`` keeps nothing).
Names load on first use, so ``import p2p_jax`` does not start TensorFlow.
"""

import importlib

from p2p_jax import cache as _cache
from p2p_jax import runtime as _runtime

_runtime.configure()
_cache.enable_compilation_cache()

__version__ = "0.1.0"
_EXPORTS = {
    "Pix2Pix": "recipe",
    "LossInputs": "losses",
    "TrainState": "train",
    "create_train_state": "train",
    "train_step": "train",
    "train_steps": "train",
    "generate": "train",
    "default_config": "configuration",
    "check_config": "configuration",
    "train_and_evaluate": "trainer",
    "load_state": "checkpoint",
    "translate_paths": "inference",
    "evaluate_checkpoint": "inference",
    "evaluate_checkpoints": "inference",
    "load_generator": "export",
    "export_generator": "export",
}
_RENAMED = {"check_config": "check"}
_MODULES = ("cache", "checkpoint", "colour", "configuration", "export", "fid", "images", "inference", "input_pipeline", "layers",
            "losses", "locking", "lpips", "metrics", "models", "perceptual", "progress", "recipe", "runtime",
            "summaries", "torch_files", "train", "trainer", "tuning")
__all__ = sorted(_EXPORTS) + list(_MODULES)


def __getattr__(name):
  if name in _EXPORTS:
    module = importlib.import_module(f"p2p_jax.{_EXPORTS[name]}")
    return getattr(module, _RENAMED.get(name, name))
  if name in _MODULES:
    return importlib.import_module(f"p2p_jax.{name}")
  raise AttributeError(f"module 'p2p_jax' has no attribute {name!r}")


def __dir__():
  return __all__
