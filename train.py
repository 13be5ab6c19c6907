"""Train CenterMask: python train.py --config configs/NAME.py --workdir DIR [--config.key=value ...]

Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
`jax.distributed.initialize` runs before any device is touched. Rerunning with the same
--workdir resumes from its latest checkpoint.
"""
import argparse
import os
import sys

from centermask_jax.config import add_config_argument, parse_command_line


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(p)
  p.add_argument("--workdir", required=True, help="output directory (checkpoints, TensorBoard)")
  p.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="multi-host: coordinator host:port")
  p.add_argument("--num_processes", type=int,
                 default=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                 help="multi-host: number of processes")
  p.add_argument("--process_id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", "0")),
                 help="multi-host: this process's index")
  args, cfg = parse_command_line(p, argv)
  import jax
  if args.coordinator_address or args.num_processes > 1:
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  from centermask_jax import compilation_cache
  compilation_cache.enable(cfg.get("compilation_cache_dir") or None)
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  from centermask_jax.training import trainer
  trainer.train_and_evaluate(cfg, args.workdir)
  return 0


if __name__ == "__main__":
  sys.exit(main())
