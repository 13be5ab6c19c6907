"""Tiny CenterMask-Lite (V-19-slim-dw-eSE, FPN 64) on the built-in synthetic shapes dataset.

Runs on a laptop CPU in minutes, with no download:
  python -m centermask_jax.data.prepare --synthetic --data-dir ~/tensorflow_datasets
  python train.py --config configs/synthetic_tiny.py --workdir /tmp/synthetic_tiny
Rerun the second command to resume. Expected: total loss falls from ~4-40 (MaskIoU head
at init) to below ~2 within 1-2k steps (batch 8, 256-px images, 5 classes).
"""
from centermask_jax import config as base


def get_config():
  c = base.base_config()
  c.name = "synthetic_tiny"
  base.lite(c)
  base.vovnet(c, "V-19-slim-dw-eSE")
  c.model.num_classes = 5  # circle, rectangle, triangle, ellipse, star
  c.model.fpn_channels = 64
  c.model.mask_head.conv_dim = 64
  c.model.maskiou_head.conv_dim = 64
  c.model.roi.max_fg_per_image = 32
  c.input.pixel_std = (57.375, 57.120, 58.395)  # unit-scale inputs: from-scratch FrozenBN nets blow up at std 1
  c.input.min_size_train = (224, 256)
  c.input.max_size_train = 320
  c.input.min_size_test = 256
  c.input.max_size_test = 320
  c.data.name = "synthetic"
  c.data.data_dir = "~/tensorflow_datasets"
  c.data.max_instances = 16
  c.data.max_polygon_parts = 8
  c.data.max_polygon_vertices = 64
  c.data.shuffle_buffer = 200
  c.optim.base_lr = 0.02      # at ims_per_batch=16 -> 0.01 at global_batch 8
  c.optim.warmup_iters = 100
  c.optim.steps = (1500, 1800)
  c.optim.max_iter = 2000
  c.train.global_batch = 8
  c.train.log_every = 10
  c.train.checkpoint_every = 200
  c.train.keep_checkpoints = 3
  c.lock()
  return c
