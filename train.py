"""Train CenterMask: python train.py --config configs/NAME.py --workdir DIR [--config.key=value ...]

Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
`jax.distributed.initialize` runs before any device is touched. Rerunning with the same
--workdir resumes from its latest checkpoint.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", None, "configs/NAME.py", lock_config=True)
flags.DEFINE_string("workdir", None, "output directory (checkpoints, TensorBoard)")
flags.DEFINE_string("coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"),
                    "multi-host: coordinator host:port")
flags.DEFINE_integer("num_processes", int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                     "multi-host: number of processes")
flags.DEFINE_integer("process_id", int(os.environ.get("JAX_PROCESS_ID", "0")),
                     "multi-host: this process's index")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  if FLAGS.coordinator_address or FLAGS.num_processes > 1:
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  from centermask_jax import compilation_cache
  compilation_cache.enable(FLAGS.config.get("compilation_cache_dir") or None)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  from centermask_jax.training import trainer
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
