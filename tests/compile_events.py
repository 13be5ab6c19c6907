"""XLA compilations counted from jax's own compile events (recompilation tests).

Importing registers one jax.monitoring listener; it changes no environment variable, so
subprocess workers may import test modules that use it.
"""
import collections

import jax

COMPILES = collections.Counter()  # function name -> XLA compilations


def _on_event(event, duration, **kw):
  del duration
  if event == "/jax/core/compile/backend_compile_duration":
    COMPILES[str(kw.get("fun_name", ""))] += 1


jax.monitoring.register_event_duration_secs_listener(_on_event)


def compile_count(name_part: str = "") -> int:
  """Number of XLA compilations so far of functions whose name contains `name_part` (all by
  default; pmapped functions are all named `_fun`)."""
  return sum(n for k, n in COMPILES.items() if name_part in k)
