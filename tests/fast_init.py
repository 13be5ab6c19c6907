"""A Flax module's `init` as one jitted program, compiled faster on CPU.

Run eagerly, `init` compiles every primitive of the forward it traces and one
`jax.random.normal` program per parameter shape (~0.5-1 s each on the CI machine); as one
program it is compiled as `trainer.random_variables` compiles the model's
(`parallel.compile_run_once`: level-1 backend optimisation on CPU, ~6 s instead of ~15 s
for a VoVNet backbone, the same numbers as the default jit; eager init differs from either
by at most 2 ulp in some leaves). Init only: the forward passes under test keep the default
compile options.
"""
from centermask_jax import parallel


def jit_init(module, *args):
  """module.init(*args) as one compiled program."""
  return parallel.compile_run_once(module.init, *args)(*args)
