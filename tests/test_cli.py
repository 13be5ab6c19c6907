"""One command line for every entry point: `--config PATH` and `--config.KEY=VALUE`
through `centermask_jax.config.parse_command_line`; a mistyped key fails the same way."""
import argparse
import importlib
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from centermask_jax import config as C

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py")

# entry point -> its arguments besides the bad key (never used: the config error comes first)
ENTRY_POINTS = {
    "train.py": ["--config", CONFIG, "--workdir", "unused"],
    "eval.py": ["--config", CONFIG, "--checkpoint", "unused", "--workdir", "unused"],
    "demo.py": ["--config", CONFIG, "--checkpoint", "unused", "--input", "unused", "--output",
                "unused"],
    "centermask_jax.tools.parity": ["--config", CONFIG, "--fixture", "unused"],
    "centermask_jax.tools.import_weights": ["--config", CONFIG, "--weights", "unused", "--out",
                                            "unused"],
    "centermask_jax.tools.export": ["--config", CONFIG, "--checkpoint", "unused", "--out",
                                    "unused"],
    "benchmarks/train_step.py": ["--config", CONFIG],
    "benchmarks/inference.py": ["--config", CONFIG],
    "benchmarks/eval_throughput.py": ["--config", CONFIG],
    "benchmarks/vs_reference.py": ["--models", "v19dw"],  # its configs are fixed per model
}


def _main(entry):
  if not entry.endswith(".py"):
    return importlib.import_module(entry).main
  name = "cli_" + entry.replace("/", "_")[:-3]
  spec = importlib.util.spec_from_file_location(name, REPO / entry)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_mistyped_key_fails_the_same_way_everywhere(entry, capsys):
  main = _main(entry)
  with pytest.raises(SystemExit) as e:
    main([*ENTRY_POINTS[entry], "--config.model.no_such_key=3"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == ["error: unknown config key 'model.no_such_key'"], (entry, err)


def test_script_exits_2_with_one_error_line():
  out = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", CONFIG,
                        "--workdir", "unused", "--config.train.no_such_key", "1"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == ["error: unknown config key 'train.no_such_key'"]


def _parse(argv, multiple=False):
  p = argparse.ArgumentParser()
  C.add_config_argument(p, multiple=multiple)
  p.add_argument("--other", type=int, default=0)
  return C.parse_command_line(p, argv)


def test_values_take_the_type_of_the_field():
  args, cfg = _parse(["--config", CONFIG, "--other", "4", "--config.train.bf16=true",
                      "--config.data.name=123", "--config.input.canvas_train=[640, 1024]",
                      "--config.optim.base_lr", "0.02", "--config.optim.max_iter=7",
                      "--config.weights=", "--config.data.data_dir='/d'"])
  assert args.other == 4
  assert cfg.train.bf16 is True and cfg.data.name == "123" and cfg.weights == ""
  assert cfg.data.data_dir == "/d"
  assert cfg.input.canvas_train == (640, 1024) and cfg.optim.base_lr == 0.02
  assert cfg.optim.max_iter == 7
  assert args.config_argv[0] == "--config.train.bf16=true"
  base = C.load_config(CONFIG)
  assert base.train.bf16 is False and base.optim.max_iter != 7  # overrides really applied
  args, cfgs = _parse(["--config", CONFIG, CONFIG, "--config.optim.max_iter=9"], multiple=True)
  assert [c.optim.max_iter for c in cfgs] == [9, 9]


@pytest.mark.parametrize("argv,message", [
    (["--config.optim.max_iter=abc"], "error: --config.optim.max_iter=abc: "),
    (["--config.train.bf16=maybe"], "error: --config.train.bf16=maybe: "),
    (["--bogus", "1"], "error: unrecognised argument '--bogus'"),
    (["--config.optim.max_iter"], "error: --config.optim.max_iter needs a value"),
    (["--config.model"], "error: --config.model needs a value"),
    (["--config.model.fcos=1"], "error: --config.model.fcos=1: "),
])
def test_bad_command_lines_give_one_error_line(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    _parse(["--config", CONFIG, *argv])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(message), err


def test_missing_config_file(capsys):
  with pytest.raises(SystemExit) as e:
    _parse(["--config", "configs/no_such_config.py"])
  assert e.value.code == 2
  assert capsys.readouterr().err.strip() == \
      "error: config file not found: configs/no_such_config.py"


def test_no_module_imports_a_top_level_script():
  scripts = {p.stem for p in REPO.glob("*.py")}
  for path in list((REPO / "centermask_jax").rglob("*.py")) + list(
      (REPO / "benchmarks").glob("*.py")) + list(REPO.glob("*.py")):
    for line in path.read_text().splitlines():
      words = line.split()
      if len(words) >= 2 and words[0] in ("import", "from") and words[1] in scripts:
        pytest.fail(f"{path.relative_to(REPO)} imports the script {words[1]!r}: {line}")


def test_print_config_lists_every_key_with_overrides(capsys):
  """Issue 15.7: `train.py --config C --print_config` prints the resolved config, every
  key as `dotted.key = value` (the form --config.KEY=VALUE takes), overrides applied."""
  main = _main("train.py")
  assert main(["--config", CONFIG, "--print_config", "--config.optim.base_lr=0.5",
               "--config.data.name=mine"]) == 0
  lines = capsys.readouterr().out.splitlines()
  printed = dict(line.split(" = ", 1) for line in lines)
  want = {}

  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        flat(v, f"{prefix}{k}.")
      else:
        want[f"{prefix}{k}"] = v
  flat(C.load_config(CONFIG).to_dict())
  assert set(printed) == set(want) and len(lines) == len(want) > 50
  assert printed["optim.base_lr"] == "0.5" and printed["data.name"] == "'mine'"
  assert printed["model.num_classes"] == repr(want["model.num_classes"])


def test_vs_reference_scales_each_row_by_the_calibrations_around_it(tmp_path, monkeypatch,
                                                                    capsys):
  """benchmarks/vs_reference.py calibrates before the first row and after every row; a row's
  reference is scaled by the mean of the two calibrations around it, and every row's x is
  printed again at the median of the run's calibrations (children faked)."""
  import json
  import types
  spec = importlib.util.spec_from_file_location("cli_vs_reference_rows",
                                                REPO / "benchmarks" / "vs_reference.py")
  vs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(vs)
  scales = iter([0.5, 0.7, None, 1.3])  # the third calibration fails
  monkeypatch.setattr(vs, "calibrate", lambda shared: (lambda s: s and {"scale": s})(
      next(scales)))
  row = dict(label="Lite V-19-slim-DW", padded="864x608", compile_s=1.0, median_s=0.25,
             min_s=0.2, peak_gib=1.0, run_gib=1.0, cpu_s=0.5, thread_cpu_s=0.25,
             loadavg=[1.0], dets=[50])
  monkeypatch.setattr(vs.subprocess, "run", lambda cmd, **kw: types.SimpleNamespace(
      returncode=0, stdout=json.dumps(dict(row, model=cmd[cmd.index("--_child") + 1],
                                           mode=cmd[cmd.index("--_child") + 2])), stderr=""))
  out = tmp_path / "rows.json"
  vs.main(["--models", "v19dw", "--modes", "infer_b1_img0", "infer_b1_img1", "infer_b2",
           "--json", str(out)])
  rows = json.loads(out.read_text())["rows"]
  assert [r["scale"] for r in rows] == pytest.approx([0.6, 0.7, 1.3])
  printed = capsys.readouterr().out
  ref = vs.REFERENCE[("v19dw", "infer_b1_img0")][0]
  assert f"{ref * 0.6:7.3f} " in printed and f"{ref * 0.6 / 0.25:5.2f}" in printed
  assert "calibration scale over the run: 0.500-1.300, median 0.700" in printed
  assert f"v19dw/infer_b1_img0 {ref * 0.7 / 0.25:.2f} / " in printed  # x at the run's median
  assert json.loads(out.read_text())["scale_median"] == pytest.approx(0.7)


_PEAK_CHILD = """
import jax, jax.numpy as jnp
x = jnp.ones((1024, 64), jnp.float32)
w = jnp.ones((64, 512), jnp.float32) * 0.01
f = lambda w, x: jnp.sum(jnp.cos(jnp.sin(x @ w)))
print(jax.jit(jax.grad(f)).lower(w, x).compile().memory_analysis().temp_size_in_bytes)
"""


def test_train_step_benchmark_reads_the_memory_peak_from_xla_dumps(tmp_path):
  """benchmarks/train_step.py --memory-top: the buffers live at a compiled program's memory
  peak, from XLA's dump, summed by the JAX op that made them. For the gradient of
  sum(cos(sin(x @ w))) the largest is a [1024, 512] float32 activation, and the peak is the
  compiled program's temporary buffers plus its arguments and output."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_dump_to={tmp_path}")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  r = subprocess.run([sys.executable, "-c", _PEAK_CHILD], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  spec = importlib.util.spec_from_file_location("cli_train_step_peak",
                                                REPO / "benchmarks" / "train_step.py")
  ts = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ts)
  peak, rows = ts.hlo_memory_peak(str(tmp_path), top=3)
  act, xb, wb = 1024 * 512 * 4, 1024 * 64 * 4, 64 * 512 * 4
  # the program's temporary buffers, its arguments and its output (d w) are live at the peak
  assert peak == int(r.stdout.split()[-1]) + xb + wb + wb, (peak, r.stdout)
  assert rows[0][0] == act and (xb, "x") in rows and (wb, "w") in rows, rows
