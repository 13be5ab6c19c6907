"""Prediction overlays."""
import numpy as np
import pytest

from centermask_jax.visualize import class_color, draw_instances


def make_case():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
  masks = np.zeros((2, 120, 160), bool)
  masks[0, 40:80, 30:70] = True
  masks[1, 10:30, 120:150] = True
  boxes = np.array([[30, 40, 70, 80], [120, 10, 150, 30]], np.float32)
  return img, masks, boxes


def test_draw_instances_changes_mask_pixels_only():
  img, masks, boxes = make_case()
  orig = img.copy()
  out = draw_instances(img, boxes, np.array([3, 7]), np.array([0.9, 0.2]), masks,
                       [f"c{i}" for i in range(10)], score_thresh=0.5)
  assert out.shape == img.shape and out.dtype == np.uint8
  np.testing.assert_array_equal(img, orig)  # input untouched
  # Interior of the drawn mask (away from outline and label): exact alpha blend.
  inner = (slice(45, 75), slice(35, 65))
  want = np.round(0.5 * orig[inner].astype(np.float32)
                  + 0.5 * np.asarray(class_color(3), np.float32))
  np.testing.assert_array_equal(out[inner], want.astype(np.uint8))
  assert (out[inner] != orig[inner]).any(axis=-1).mean() > 0.9
  # The instance under the threshold is not drawn; far pixels are unchanged.
  np.testing.assert_array_equal(out[8:32, 118:152], orig[8:32, 118:152])
  np.testing.assert_array_equal(out[90:, :], orig[90:, :])
  np.testing.assert_array_equal(out[:, 80:110], orig[:, 80:110])
  # Box outline drawn in the class colour.
  assert tuple(out[60, 30]) == class_color(3)
  # Label above the box changes pixels there.
  assert (out[28:40, 30:70] != orig[28:40, 30:70]).any()


def test_draw_instances_deterministic_and_empty():
  img, masks, boxes = make_case()
  a = draw_instances(img, boxes, np.array([3, 7]), np.array([0.9, 0.9]), masks, None, 0.5)
  b = draw_instances(img, boxes, np.array([3, 7]), np.array([0.9, 0.9]), masks, None, 0.5)
  np.testing.assert_array_equal(a, b)
  assert class_color(3) == class_color(3) and class_color(3) != class_color(7)
  assert len({class_color(i) for i in range(80)}) == 80
  none = draw_instances(img, np.zeros((0, 4)), np.zeros((0,), int), np.zeros((0,)),
                        np.zeros((0, 120, 160), bool), None, 0.5)
  np.testing.assert_array_equal(none, img)
  no_masks = draw_instances(img, boxes, np.array([3, 7]), np.array([0.9, 0.9]), None, None, 0.5)
  np.testing.assert_array_equal(no_masks[50:70, 40:60], img[50:70, 40:60])
  with pytest.raises(ValueError):
    draw_instances(img.astype(np.float32), boxes, None, None, None)


def test_labels_of_coinciding_boxes_do_not_overlap():
  from centermask_jax.visualize import _overlap, layout_labels
  boxes = [(40, 50, 120, 90)] * 4 + [(0, 0, 30, 20)]
  sizes = [(50, 12)] * 5
  rects = layout_labels(boxes, sizes, (200, 300))
  assert rects[0] == (40, 38, 90, 50)  # first choice: above the box's top-left corner
  for i, a in enumerate(rects):
    assert 0 <= a[0] and a[2] <= 300 and 0 <= a[1] and a[3] <= 200
    assert (a[2] - a[0], a[3] - a[1]) == (50, 12)
    for b in rects[i + 1:]:
      assert _overlap(a, b) == 0, (a, b)


def test_label_text_scales_with_the_image():
  from PIL import ImageDraw, Image
  from centermask_jax.visualize import font_for
  d = ImageDraw.Draw(Image.new("RGB", (10, 10)))
  small = d.textbbox((0, 0), "person 0.99", font=font_for((120, 160)))
  large = d.textbbox((0, 0), "person 0.99", font=font_for((1200, 1600)))
  assert (large[3] - large[1]) >= 2.5 * (small[3] - small[1])
  # drawn: a 1600-px image's label is taller than the default 11-px bitmap font
  img = np.zeros((1200, 1600, 3), np.uint8)
  out = draw_instances(img, np.array([[400, 400, 900, 900]], np.float32), np.array([0]),
                       np.array([0.9]), None, ["person"], 0.5)
  rows = np.nonzero((out[:400, 400:900] == class_color(0)).all(-1).any(-1))[0]
  assert rows.size and rows.max() - rows.min() >= 20
