"""Host CPU device count (`host_devices`) and the trainer's device choice
(`parallel.train_devices`). No compilation; one small subprocess (the flag must be set
before JAX starts)."""
import os
import subprocess
import sys

import jax
import pytest

from centermask_jax import errors, host_devices as H, parallel
from conftest import REPO

FLAG = "--xla_force_host_platform_device_count"


def test_auto_sets_one_device_per_core_and_keeps_other_flags():
  env = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  assert H.configure(environ=env, cores=3) == 3
  assert env["XLA_FLAGS"] == f"--xla_cpu_enable_fast_math=false {FLAG}=3"
  env = {}
  assert H.configure(environ=env, cores=1) == 1 and "XLA_FLAGS" not in env
  env = {"JAX_PLATFORMS": "cuda,cpu"}
  assert H.configure(environ=env, cores=2) == 2 and env["XLA_FLAGS"] == f"{FLAG}=2"


def test_user_flag_wins_and_override():
  env = {"XLA_FLAGS": f"{FLAG}=4 --foo", H.ENV: "1"}
  assert H.configure(environ=env, cores=2) == 4
  assert env["XLA_FLAGS"] == f"{FLAG}=4 --foo"  # untouched
  env = {H.ENV: "1"}  # off
  assert H.configure(environ=env, cores=2) == 1 and "XLA_FLAGS" not in env
  env = {H.ENV: "3"}
  assert H.configure(environ=env, cores=2) == 3 and env["XLA_FLAGS"] == f"{FLAG}=3"
  env = {H.ENV: "auto", "JAX_PLATFORMS": "tpu"}
  assert H.configure(environ=env, cores=5, auto=False) == 5
  for bad in ("0", "two", "-1"):
    with pytest.raises(errors.UserError, match=H.ENV):
      H.configure(environ={H.ENV: bad}, cores=2)
  with pytest.raises(errors.UserError, match="not an integer"):
    H.configure(environ={"XLA_FLAGS": f"{FLAG}=x"}, cores=2)


def test_explicit_count_replaces_flag_and_auto_off_cases():
  env = {"XLA_FLAGS": f"--a {FLAG}=4 --b"}
  assert H.configure(2, environ=env, cores=8) == 2
  assert env["XLA_FLAGS"] == f"--a --b {FLAG}=2"
  with pytest.raises(errors.UserError):
    H.configure(0, environ={}, cores=2)
  env = {"JAX_PLATFORMS": "cuda"}  # no CPU platform: nothing set
  assert H.configure(environ=env, cores=4) == 1 and "XLA_FLAGS" not in env
  env = {}  # multi-process: no auto
  assert H.configure(environ=env, cores=4, auto=False) == 1 and "XLA_FLAGS" not in env


def test_device_count_for_batch():
  f = H.device_count_for_batch
  assert [f(b, 2) for b in (1, 2, 3, 4, 5, 6)] == [1, 2, 1, 2, 1, 2]
  assert [f(b, 4) for b in (1, 2, 3, 4, 6, 8, 9)] == [1, 2, 3, 4, 3, 4, 3]
  assert f(4, 4, processes=2) == 2 and f(6, 2, processes=2) == 1 and f(3, 2, processes=2) == 0
  assert f(0, 4) == 0


def test_train_devices_fits_the_batch():
  local = jax.local_devices()
  assert len(local) == 4
  devs, note = parallel.train_devices(6)
  assert devs == local[:3] and "using 3 of 4" in note and "global_batch=6" in note
  assert parallel.train_devices(8) == (local, "")
  assert parallel.train_devices(1)[0] == local[:1]
  assert parallel.train_devices(6, local[:2]) == (local[:2], "")
  with pytest.raises(ValueError, match="not divisible by 4 devices"):
    parallel.train_devices(6, local)  # given devices are used as given


def test_configure_before_jax_gives_cpu_devices():
  """The entry points' call: flag unset -> one CPU device per usable core (here forced to
  2 via the override, so the test does not depend on this machine's cores); the default
  backend's local devices are those CPU devices."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update({H.ENV: "2", "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"})
  code = ("from centermask_jax import host_devices as H; n = H.configure(); import jax; "
          "print(n, jax.local_device_count(), jax.devices()[0].platform, H.configure())")
  r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.split() == ["2", "2", "cpu", "2"]
