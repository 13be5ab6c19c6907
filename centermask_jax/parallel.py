"""Device layout: the one home of how steps, batches and state map onto devices.

Layout of the default (pmap) path: host batches are [D, B, ...] (D = local devices, B =
per-device batch, see docs/CONVENTIONS.md), state and variables carry a leading [D] axis of
identical copies, per-device metrics come back as [D] arrays. Collectives use axis `AXIS`.
In a multi-process run pmap spans every device of every process.

`make_shard_map_step` is the same step as one `jit` of a `shard_map` over a 1-D mesh: state
is a plain tree placed replicated on the mesh (`replicate_on_mesh`), batches stay [D, B, ...]
and are split over the mesh axis, metrics come back unstacked.
"""
from typing import Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from centermask_jax import host_memory

AXIS = "batch"


def pmap_devices(devices: Optional[Sequence] = None):
  """pmap's `devices`: None (= every device of every process) in a multi-process run, so
  that the collectives span all processes; a local subset only in a single process."""
  if jax.process_count() == 1:
    return None if devices is None else list(devices)
  if devices is not None and set(devices) != set(jax.local_devices()):
    raise ValueError("multi-process training uses every local device; got a subset")
  return None


def train_devices(global_batch: int, devices: Optional[Sequence] = None):
  """-> (local devices the training step runs on, a note for the devices banner).

  Given `devices`, those (every process's count must divide the global batch). Default: in
  one process the largest number of local devices that divides `global_batch` (e.g. 3 of 4
  for a batch of 6, noted); across processes every local device (pmap spans them all).
  Raises ValueError (before any data or compile) when the batch does not split evenly."""
  from centermask_jax import host_devices
  pc, note = jax.process_count(), ""
  local = list(jax.local_devices())
  if devices is None and pc == 1:
    d = max(1, host_devices.device_count_for_batch(global_batch, len(local)))
    if d < len(local):
      note = (f" (using {d} of {len(local)} local devices: the most that divide "
              f"train.global_batch={global_batch})")
    devices = local[:d]
  devices = list(devices or local)
  if global_batch < 1 or global_batch % (len(devices) * pc):
    raise ValueError(f"train.global_batch={global_batch} is not divisible by "
                     f"{len(devices) * pc} devices ({pc} processes x {len(devices)} local)")
  return devices, note


def make_pmap_step(step_fn: Callable, devices: Optional[Sequence] = None,
                   donate_state: bool = True):
  """step_fn(state, batch, rng) per device (collectives over AXIS) ->
  pmapped (state [D, ...], batch [D, B, ...], rng) -> (state [D, ...], metrics [D])."""
  return jax.pmap(step_fn, axis_name=AXIS, in_axes=(0, 0, None),
                  donate_argnums=(0,) if donate_state else (), devices=pmap_devices(devices))


def make_pmap(fn: Callable, devices: Optional[Sequence] = None):
  """Per-device fn(*args) -> pmapped over the given local devices (inference, paste)."""
  return jax.pmap(fn, axis_name=AXIS, devices=None if devices is None else list(devices))


def replicate(tree, devices: Optional[Sequence] = None, across_processes: bool = True):
  """Host tree -> per-device copies [D, ...] laid out as the pmapped functions expect.

  across_processes: for a step made by `make_pmap_step` (spans every process); False for
  functions of `make_pmap` (this process's devices only, e.g. evaluation)."""
  devices = list(devices or jax.local_devices())
  if not jax.tree_util.tree_leaves(tree):
    return tree
  stacked = jax.tree_util.tree_map(
      lambda x: np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), tree)
  pdev = pmap_devices(devices) if across_processes else devices
  return jax.pmap(lambda x: x, axis_name=AXIS, devices=pdev)(stacked)


def local_copy(tree):
  """[D, ...] replicated tree (also one spanning processes) -> NumPy copy of this process's
  first device. Copies that device's buffer (waiting for the step that writes it) and
  dispatches no computation, so it is safe while later steps are in flight and after the
  buffer is donated to the next step (indexing x[0] compiled a gather over all devices per
  leaf, and aborted XLA:CPU under load in CI)."""
  return jax.tree_util.tree_map(
      lambda x: np.array(x.addressable_data(0), copy=True).reshape(x.shape[1:]), tree)


def first_device_metrics(metrics) -> dict:
  """{name: [D] per-device scalars, on the devices or already on the host} -> {name: float}
  of device 0 (metrics are pmean-ed)."""
  return {k: float(v[0]) for k, v in jax.device_get(metrics).items()}


def shard_batch(batch: dict, num_devices: int) -> dict:
  """Host batch {key: [D * B, ...]} -> {key: [D, B, ...]} (device-major split)."""
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    if v.shape[0] % num_devices:
      raise ValueError(f"batch key {k!r}: leading size {v.shape[0]} is not divisible by "
                       f"{num_devices} devices")
    out[k] = v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:])
  return out


def make_mesh(devices: Optional[Sequence] = None) -> Mesh:
  """1-D mesh over `devices` (default: every device) with axis AXIS."""
  return Mesh(np.asarray(list(devices or jax.devices())), (AXIS,))


def replicate_on_mesh(tree, mesh: Mesh):
  """Host tree -> the same tree placed replicated on every device of `mesh`."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def make_shard_map_step(step_fn: Callable, mesh: Mesh, donate_state: bool = True):
  """step_fn(state, batch, rng) per device (collectives over AXIS) ->
  jit(shard_map): (state replicated on mesh, batch [D, B, ...], rng) -> (state, metrics).

  The step must leave state and metrics identical on every device (pmean-ed gradients and
  metrics), as the pmap step does: outputs are declared replicated.
  """
  def per_device(state, batch, rng):
    return step_fn(state, jax.tree_util.tree_map(lambda x: x[0], batch), rng)
  name = getattr(step_fn, "__name__", None) or getattr(step_fn.func, "__name__", "step")
  per_device.__name__ = per_device.__qualname__ = f"shard_map_{name}"

  mapped = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS), P()),
                         out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,) if donate_state else ())


def drop_compiled_programs():
  """Drops jax's compiled executables and traces (`jax.clear_caches`) and hands the freed
  heap back to the OS: for a point after which the programs compiled so far are not run
  again (they would be compiled anew). Changes no computation."""
  import gc
  jax.clear_caches()
  gc.collect()
  host_memory.release_host_memory()


def compile_ahead(fn, *args):
  """fn.lower(*args).compile(), then `host_memory.release_host_memory()`: a step compiled
  before its first run, so the heap the compiler frees goes back to the OS before the step
  allocates its own buffers (peak RSS = max(compile, step), not their sum). -> the executable."""
  executable = fn.lower(*args).compile()
  host_memory.release_host_memory()
  return executable


def compile_run_once(fn, *args, static_argnums=()):
  """`jax.jit(fn).lower(*args).compile()` for a program that runs once (variable init). On
  CPU at XLA's backend optimisation level 1: `trainer.random_variables` took 8-17 s instead
  of 14-21 s on six configs, with the same variables bit for bit (1938 leaves; the init
  programs are integer hashing and elementwise maps). -> the executable (call it with the
  arguments that are not static)."""
  lowered = jax.jit(fn, static_argnums=static_argnums).lower(*args)
  opts = {"xla_backend_optimization_level": 1} if jax.default_backend() == "cpu" else {}
  return lowered.compile(compiler_options=opts)


def batch_sharding(devices):
  """The sharding pmap gives a [D, ...] array over the local `devices` (its input layout)."""
  probe = jax.pmap(lambda x: x, axis_name=AXIS, devices=devices)(
      np.zeros((len(devices),), np.int8))
  return probe.sharding


class DevicePrefetch:
  """Iterator of [D, B, ...] batches copied to the devices `size` batches ahead: copies are
  asynchronous, so batch i+1 travels while step i runs. get_state() / set_state() are the
  wrapped iterator's, as of the next batch this one yields (exact resume)."""

  def __init__(self, iterator, devices, size: int = 2):
    self._it, self._size = iterator, max(1, int(size))
    self._sharding = batch_sharding(list(devices))
    self._queue = []  # (state before the batch, device batch)

  def __iter__(self):
    return self

  def _fill(self):
    while len(self._queue) < self._size:
      state = self._it.get_state()
      try:
        batch = next(self._it)
      except StopIteration:
        return
      self._queue.append((state, jax.device_put(batch, self._sharding)))

  def __next__(self):
    self._fill()
    if not self._queue:
      raise StopIteration
    _, batch = self._queue.pop(0)
    self._fill()
    return batch

  def get_state(self):
    return self._queue[0][0] if self._queue else self._it.get_state()

  def set_state(self, state):
    self._queue.clear()
    self._it.set_state(state)
