"""Saving and loading model variables with orbax.

A *model checkpoint directory* (written by `tools/import_weights` and readable by
`eval.py`, `demo.py` and `Predictor`) holds
  variables/    orbax StandardCheckpointer tree {"params": ..., "frozen_bn": ...}
  config.json   the model config it was written with (informative)
  classes.json  the classes the model predicts (checkpoints/classes.py)
`load_model_variables` also accepts an official .pth/.pkl file (imported on the fly)
and a train.py workdir (the latest checkpoint's variables).
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from centermask_jax.checkpoints import official, workdir

VARIABLES = "variables"


def save_variables(directory: str, variables, config=None, classes=None):
  """Writes `variables` (and config.json, classes.json given a `classes.ClassInfo`) to a
  new model checkpoint directory."""
  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, VARIABLES)
  if os.path.exists(target):
    raise FileExistsError(f"{target} exists; choose a new --out directory")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(target, jax.tree_util.tree_map(np.asarray, variables))
  ckptr.wait_until_finished()
  if config is not None:
    with open(os.path.join(directory, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  if classes is not None:
    from centermask_jax.checkpoints import classes as classes_lib
    classes_lib.write(directory, classes)


def load_variables(directory: str, template):
  """Restores variables saved by `save_variables` into the structure of `template`."""
  target = os.path.join(os.path.abspath(directory), VARIABLES)
  if not os.path.isdir(target):
    raise FileNotFoundError(f"no '{VARIABLES}' checkpoint in {directory}")
  restored = ocp.StandardCheckpointer().restore(target)
  return official.strict_like(template, restored, source=target)


def load_model_variables(path: str, model, rng_seed: int = 0):
  """Variables for `model` from a checkpoint dir, a train workdir, or an official file."""
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(rng_seed)))
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
  if os.path.isfile(path):
    return official.import_checkpoint(template, path)
  if os.path.isdir(os.path.join(path, VARIABLES)):
    return load_variables(path, template)
  return workdir.load_latest_variables(path, template)


def read_config_json(directory: str):
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
