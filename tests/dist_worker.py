"""One process of the 2-process jax.distributed test (tests/test_distributed.py).

  python tests/dist_worker.py PORT PROCESS_ID NUM_PROCESSES WORKDIR OUT.npz [DATA_DIR]

Runs 2 train steps of the tiny test config through `trainer.train_and_evaluate` with gloo
CPU collectives, LOCAL host devices per process; each process feeds its own rows of every
global batch. With DATA_DIR (a prepared dataset named "four"), the evaluation hook then runs
at step 2 = max_iter on its val split, sharded over the processes. Writes the final params
(flattened) to OUT.npz.
"""
import os
import sys

LOCAL = 2  # devices per process: collectives within and across processes
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={LOCAL}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main():
  port, pid, nproc, workdir, out = sys.argv[1:6]
  data_dir = sys.argv[6] if len(sys.argv) > 6 else None
  pid, nproc = int(pid), int(nproc)
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                             process_id=pid)
  import numpy as np
  from flax import traverse_util

  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_train import FakeIterator, split, make_batch, tiny_config
  from centermask_jax.training import trainer

  class Shard(FakeIterator):
    """This process's rows of the global batch of FakeIterator(global devices, 1)."""

    def __next__(self):
      g = make_batch(nproc * LOCAL, 100 + self.step)
      self.step += 1
      return split({k: v[pid * LOCAL:(pid + 1) * LOCAL] for k, v in g.items()}, LOCAL)

  c = tiny_config()
  c.train.global_batch = nproc * LOCAL
  if data_dir:
    c.data.name, c.data.data_dir = "four", data_dir
    c.optim.max_iter = 2
    c.train.eval_every = 0
    # small test images (as tests/test_overfit.py), not the Lite 600 px test size
    c.input.min_size_test, c.input.max_size_test = 128, 192
    c.input.canvas_test = ((128, 192), (192, 128))
  res = trainer.train_and_evaluate(c, workdir, Shard(LOCAL, 1), num_steps=2,
                                   async_checkpoints=False, quiet=True)
  flat = traverse_util.flatten_dict(res["state"]["params"], sep="/")
  np.savez(out, step=res["step"], loss=res["metrics"]["total_loss"],
           evaluated=sorted(res["eval"]),
           **{k: np.asarray(v) for k, v in flat.items()})
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
