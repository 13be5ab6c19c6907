"""One error style (issue 12.5): user errors are one `error: ...` line, exit status 2."""
import pathlib
import pickle
import sys

import numpy as np
from PIL import Image

from centermask_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONFIG = str(REPO / "configs" / "synthetic_tiny.py")


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, "w"))


def _one_line(capsys, rc, *needles):
  err = capsys.readouterr().err
  assert rc == 2 and err.count("error:") == 1 and len(err.strip().splitlines()) == 1, err
  for n in needles:
    assert n in err, err


def test_train_missing_dataset_is_one_line(tmp_path, capsys):
  import train as train_cli
  rc = cli.run(train_cli.main, ["--config", CONFIG, "--workdir", str(tmp_path / "w"),
                                f"--config.data.data_dir={tmp_path / 'nodata'}"])
  _one_line(capsys, rc, str(tmp_path / "nodata"))


def test_demo_refuses_malicious_pickles_in_one_line(tmp_path, capsys):
  """A .pkl with a code-running payload, the same bytes named .pth and named .bin: refused
  with one line, payload never run."""
  import demo
  img = tmp_path / "img.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
  marker = tmp_path / "pwned"
  data = pickle.dumps({"model": _Evil(str(marker))}, protocol=2)
  for name in ("evil.pkl", "evil.pth", "evil.bin"):
    path = tmp_path / name
    path.write_bytes(data)
    rc = cli.run(demo.main, ["--config", CONFIG, "--checkpoint", str(path), "--input",
                             str(img), "--output", str(tmp_path / "out")])
    _one_line(capsys, rc, name)
    assert not marker.exists()


def test_import_weights_refuses_a_malicious_plain_pickle_in_one_line(tmp_path, capsys):
  """A code-running plain pickle not named .pkl (it gave 'Unsupported operand 149')."""
  from centermask_jax.tools import import_weights
  marker = tmp_path / "pwned"
  path = tmp_path / "weights.dat"
  path.write_bytes(pickle.dumps({"model": _Evil(str(marker))}, protocol=2))
  rc = cli.run(import_weights.main, ["--config", CONFIG, "--weights", str(path), "--out",
                                     str(tmp_path / "out")])
  _one_line(capsys, rc, "weights.dat")
  assert not marker.exists() and not (tmp_path / "out").exists()
