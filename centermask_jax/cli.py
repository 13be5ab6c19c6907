"""One error style for the command lines (train.py, eval.py, demo.py, prepare, tools).

`run(main, argv)` calls `main(argv)`; an error that is the user's input
(`errors.UserError`: a bad config, a checkpoint that does not fit the model, a changed
config on resume, a class mismatch, a malformed annotation file; and a missing file,
directory or permission, or an unreadable pickle) becomes one `error: ...` line on stderr
and exit status 2; a run that had to stop (`errors.RunError`: a non-finite step, a
checkpoint that could not be saved) one line, status 1.
CENTERMASK_JAX_TRACEBACK=1 re-raises instead (full traceback).
Imports only `centermask_jax.errors`, so any entry point (prepare included) may use it.
"""
import os
import pickle
import sys

from centermask_jax import errors

USER_ERROR, RUN_ERROR = 2, 1
_USER_ERROR_TYPES = (errors.UserError, pickle.UnpicklingError, FileNotFoundError,
                     NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)


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
  except errors.RunError as e:
    print(error_line(e, limit=2000), file=sys.stderr)
    return RUN_ERROR
  except _USER_ERROR_TYPES as e:
    print(error_line(e), file=sys.stderr)
    return USER_ERROR
