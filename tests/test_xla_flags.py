"""The package's XLA flags (`centermask_jax.xla_flags`): set on import, the user's kept."""
import pathlib
import re

import jax
import jax.numpy as jnp

from centermask_jax import xla_flags as X

YNN = "--xla_cpu_experimental_ynn_fusion_type"


def test_apply_appends_keeps_the_users_and_skips_unverified_jaxlib():
  v = X.VERIFIED_JAXLIB[0]
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert X.apply(env, v) == [f"{YNN}=-individual_convolution"]
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {YNN}=-individual_convolution"
  assert X.apply(env, v) == []  # named now: unchanged
  env = {}
  X.apply(env, v)
  assert env["XLA_FLAGS"] == f"{YNN}=-individual_convolution"
  env = {"XLA_FLAGS": f"{YNN}="}  # the user's own value (YNNPACK off) is kept
  assert X.apply(env, v) == [] and env["XLA_FLAGS"] == f"{YNN}="
  env = {}
  assert X.apply(env, "0.0.1") == [] and env == {}  # an unknown flag would abort XLA


def test_the_pinned_jaxlib_is_verified():
  text = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
  pin = re.search(r'"jaxlib==([^"]+)"', text).group(1)
  assert pin in X.VERIFIED_JAXLIB


def test_convolutions_leave_ynnpack_dots_keep_it():
  """In this process (conftest imports the package before JAX starts): a conv of a size
  that XLA:CPU hands to YNNPACK by default is XLA's own, the dot after it YNNPACK's."""
  x = jnp.ones((1, 64, 64, 128))
  w = jnp.ones((3, 3, 128, 128))
  m = jnp.ones((128, 256))
  f = lambda x, w, m: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) @ m
  text = jax.jit(f).lower(x, w, m).compile().as_text()
  ynn_calls = set(re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", text))
  bodies = dict(re.findall(r"^%([\w.\-]+) .*?\{\n(.*?)\n\}", text, re.S | re.M))
  ynn_ops = " ".join(bodies.get(c, "") for c in ynn_calls)
  assert " convolution(" in text and " convolution(" not in ynn_ops
  assert " dot(" in ynn_ops
