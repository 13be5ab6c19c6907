"""Classes stored with checkpoints and the model/dataset class check (pure Python)."""
import json

import pytest

from centermask_jax.checkpoints import classes


def _ds(names, ids=None):
  return classes.ClassInfo(len(names), list(names), list(ids or range(1, len(names) + 1)),
                           "dataset toy")


def test_equal_classes_give_the_dataset_ids():
  ds = _ds(["a", "b", "c"], [3, 7, 9])
  assert classes.check_against_dataset(_ds(["a", "b", "c"]), ds) == {0: 3, 1: 7, 2: 9}
  unknown = classes.ClassInfo(3, source="official checkpoint (names unknown)")
  assert classes.check_against_dataset(unknown, ds) == {0: 3, 1: 7, 2: 9}


@pytest.mark.parametrize("model,why", [
    (["a", "b"], "class counts differ"),
    (["a", "c", "b"], "class names differ"),
])
def test_mismatch_is_one_line_naming_both_sides(model, why):
  ds = _ds(["a", "b", "c"])
  with pytest.raises(classes.ClassMismatchError) as e:
    classes.check_against_dataset(_ds(model), ds, what="checkpoint X")
  msg = str(e.value)
  assert "\n" not in msg and why in msg and "--class_map=by_name" in msg
  assert f"checkpoint X predicts {len(model)} classes" in msg and "dataset toy has 3 classes" in msg


def test_map_by_name_keeps_matching_names_only():
  ds = _ds(["cat", "dog", "car"], [17, 18, 3])
  got = classes.check_against_dataset(_ds(["dog", "zebra", "cat"]), ds, map_by_name=True)
  assert got == {0: 18, 2: 17}
  with pytest.raises(classes.ClassMismatchError, match="none of the"):
    classes.check_against_dataset(_ds(["x"]), ds, map_by_name=True)
  with pytest.raises(classes.ClassMismatchError, match="carries no class names"):
    classes.check_against_dataset(classes.ClassInfo(3), ds, map_by_name=True)


def test_stored_classes_round_trip_and_official_defaults(tmp_path):
  info = _ds(["a", "b"], [5, 6])
  classes.write(str(tmp_path), info)
  assert json.loads((tmp_path / "classes.json").read_text())["names"] == ["a", "b"]
  assert classes.read(str(tmp_path)) == info
  ck, _ = classes.check_checkpoint(str(tmp_path), 2)
  assert ck == info
  with pytest.raises(classes.ClassMismatchError, match="model.num_classes = 80"):
    classes.check_checkpoint(str(tmp_path), 80)
  official = tmp_path / "model.pth"
  official.write_bytes(b"")
  coco = classes.of_checkpoint(str(official), 80)
  assert coco.names[0] == "person" and coco.category_ids[-1] == 90 and coco.num_classes == 80
  assert classes.of_checkpoint(str(official), 5).names is None
