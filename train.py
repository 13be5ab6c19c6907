"""Train CenterMask: python train.py --config configs/NAME.py --workdir DIR [--config.key=value ...]

Multi-host: --coordinator_address HOST:PORT --num_processes N --process_id I (or the
environment variables JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID);
`jax.distributed.initialize` runs before any device is touched. Rerunning with the same
--workdir resumes from its latest checkpoint; Ctrl-C stops after the current step with a
checkpoint of it (exit status 130). WORKDIR gets log.txt, metrics.jsonl, config.json, tb/.
--print_config prints the resolved config (every key as `key.path = value`, after the
overrides) and exits. CENTERMASK_JAX_HOST_DEVICES=auto (or N) splits a CPU host into one
XLA device per core (or N; `centermask_jax.host_devices`); the step runs data-parallel on
as many local devices as divide train.global_batch.
"""
import argparse
import os
import sys

from centermask_jax import runlog
from centermask_jax.config import add_config_argument, format_config, parse_command_line


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  add_config_argument(p)
  p.add_argument("--workdir", help="output directory (checkpoints, log.txt, metrics.jsonl, tb/)")
  p.add_argument("--print_config", action="store_true",
                 help="print the resolved config (every key) and exit")
  p.add_argument("--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="multi-host: coordinator host:port")
  p.add_argument("--num_processes", type=int,
                 default=int(os.environ.get("JAX_NUM_PROCESSES", "1")),
                 help="multi-host: number of processes")
  p.add_argument("--process_id", type=int, default=int(os.environ.get("JAX_PROCESS_ID", "0")),
                 help="multi-host: this process's index")
  args, cfg = parse_command_line(p, argv)
  if args.print_config:
    print(format_config(cfg), end="")
    return 0
  if not args.workdir:
    print("error: --workdir is required (output directory)", file=sys.stderr)
    return 2
  runlog.quiet_startup()  # before TensorFlow / JAX are imported
  multi = bool(args.coordinator_address or args.num_processes > 1)
  from centermask_jax import host_devices
  host_devices.configure(auto=host_devices.ENTRY_POINT_AUTO and not multi)  # before JAX
  import jax
  if multi:
    if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts only
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)
  from centermask_jax import compilation_cache
  compilation_cache.enable(cfg.get("compilation_cache_dir") or None)
  from centermask_jax.training import trainer
  result = trainer.train_and_evaluate(cfg, args.workdir)  # user errors: cli.run (one line)
  return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
  from centermask_jax import cli, host_memory
  host_memory.reexec_with_hugepage_malloc()  # before any work: huge pages for XLA's buffers
  sys.exit(cli.run(main))
