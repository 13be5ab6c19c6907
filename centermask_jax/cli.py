"""One error style for the command lines (train.py, eval.py, demo.py, prepare, tools).

`run(main, argv)` calls `main(argv)`; an error that is the user's input (a missing file or
dataset, a refused or unreadable checkpoint / pickle, a checkpoint that does not fit the
model, a changed config on resume, a class mismatch) becomes one `error: ...` line on
stderr and exit status 2; a diverged run (non-finite step) or a checkpoint that could not be saved one line,
status 1.
CENTERMASK_JAX_TRACEBACK=1 re-raises instead (full traceback).
"""
import os
import pickle
import sys

USER_ERROR, RUN_ERROR = 2, 1


def _user_error_types():
  from centermask_jax.checkpoints import classes, official
  from centermask_jax.config import ConfigError
  from centermask_jax.training.config_change import ConfigChangeError
  return (ConfigError, ConfigChangeError, classes.ClassMismatchError,
          official.CheckpointMismatchError, official.CheckpointFormatError,
          pickle.UnpicklingError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
          PermissionError, FileExistsError)


def error_line(e: BaseException, limit: int = 600) -> str:
  """`error: <message>` on one line (a multi-line message joined with '; ', cut at limit)."""
  msg = "; ".join(x.strip() for x in str(e).splitlines() if x.strip()) or type(e).__name__
  if isinstance(e, OSError) and e.filename and e.strerror:
    msg = f"{e.filename}: {e.strerror}"
  return "error: " + (msg if len(msg) <= limit else msg[:limit] + " ...")


def run(main, argv=None) -> int:
  """main(argv) -> exit status, with user errors as one line (status 2)."""
  if os.environ.get("CENTERMASK_JAX_TRACEBACK"):
    return main(argv)
  try:
    return main(argv)
  except Exception as e:  # noqa: BLE001 - classified below, re-raised if not ours
    from centermask_jax.training.checkpointing import CheckpointSaveError
    from centermask_jax.training.guard import NonFiniteLossError
    if isinstance(e, (NonFiniteLossError, CheckpointSaveError)):
      print(error_line(e, limit=2000), file=sys.stderr)
      return RUN_ERROR
    if isinstance(e, _user_error_types()):
      print(error_line(e), file=sys.stderr)
      return USER_ERROR
    raise
