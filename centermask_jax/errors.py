"""The two kinds of failure the command lines tell apart (`centermask_jax.cli.run`).

UserError: the user's input is wrong (a config key, a dataset, a checkpoint that does not
fit, a malformed annotation file): one `error: ...` line, exit status 2.
RunError: a run that had to stop (non-finite step, a checkpoint that could not be saved):
one line, exit status 1.
A leaf module (imports nothing of the package), so every layer may raise these and
`cli.run` classifies them without importing the layers above it.
"""


class UserError(Exception):
  """Bad user input; reported as one line, exit status 2."""


class RunError(Exception):
  """A run that stopped; reported as one line, exit status 1."""
