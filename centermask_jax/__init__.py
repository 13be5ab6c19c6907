"""centermask-jax: CenterMask (CVPR 2020) instance segmentation in JAX/Flax.

Faithful to centermask2 (detectron2): loads its checkpoints and reproduces its
outputs stage by stage. See README.md for usage.
"""

__version__ = "0.1.0"
