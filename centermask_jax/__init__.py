"""centermask-jax: CenterMask (CVPR 2020) instance segmentation in JAX/Flax.

Faithful to centermask2 (detectron2): loads its checkpoints and reproduces its
outputs stage by stage. See README.md for usage. Importing the package sets its XLA flags
in XLA_FLAGS when JAX's backend has not started yet (`centermask_jax.xla_flags`).
"""
from centermask_jax import xla_flags as _xla_flags

_xla_flags.apply()

__version__ = "0.1.0"
