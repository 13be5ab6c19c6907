"""Shared test helper: the lite fixture's GT (gt_instances.json) as batch-contract arrays."""
from centermask_jax.tools.parity_train import load_fixture_gt


def load_gt(fixture, g=6, p=3, v=20):
  """gt_instances.json -> padded batch-contract GT arrays for the 2 fixture images."""
  return load_fixture_gt(str(fixture), g, p, v)
