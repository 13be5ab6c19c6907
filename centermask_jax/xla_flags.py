"""XLA flags the package sets before JAX starts: one home (imports nothing from JAX).

XLA:CPU hands convolutions and dots to YNNPACK by default. Its convolutions measured slower
here than XLA's own (Eigen) on every model (docs/PERFORMANCE.md, "XLA:CPU's convolution
library"): V-39 inference -10 %, its train step -5 %, Lite MobileNetV2 -3 %, Lite
V-19-slim-DW -1.5 %, while YNNPACK's dots stay faster for the train steps' matmul
gradients. So importing `centermask_jax` appends DEFAULTS to XLA_FLAGS (read once, when
JAX's backend starts), with three exceptions: XLA_FLAGS already names the flag (the user's
choice is kept), JAX's backend has already started (the process keeps XLA's default, equal
up to float rounding), or jaxlib is not a version the flag was verified on (an unknown
flag in XLA_FLAGS aborts the process). `python -m centermask_jax.tools.parity` with it:
V-39 and Lite V-19-slim-DW pass every stage (as without), Lite MobileNetV2 138/155 eval and
31/35 train stages (129 and 29 without: XLA's conv sums are closer to PyTorch's).
"""
import os
from importlib import metadata
from typing import MutableMapping, Optional

# flag -> value; applied on the jaxlib versions of VERIFIED_JAXLIB
DEFAULTS = {"--xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
VERIFIED_JAXLIB = ("0.10.2",)


def _jaxlib_version() -> Optional[str]:
  try:
    return metadata.version("jaxlib")
  except metadata.PackageNotFoundError:
    return None


def apply(environ: Optional[MutableMapping[str, str]] = None,
          jaxlib_version: Optional[str] = None) -> list:
  """Appends each DEFAULTS flag that XLA_FLAGS does not name to environ["XLA_FLAGS"]
  (default os.environ), unless JAX's backend has started or jaxlib (default: the installed
  one) is not in VERIFIED_JAXLIB. -> the flags added ("--name=value" strings)."""
  from centermask_jax import host_devices
  environ = os.environ if environ is None else environ
  if environ is os.environ and host_devices.backend_started():
    return []
  if (jaxlib_version or _jaxlib_version()) not in VERIFIED_JAXLIB:
    return []
  flags = environ.get("XLA_FLAGS", "")
  names = {f.split("=", 1)[0] for f in flags.split()}
  added = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in names]
  if added:
    environ["XLA_FLAGS"] = " ".join([flags.strip()] + added).strip()
  return added
