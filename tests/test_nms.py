"""Class-aware NMS vs. a straightforward NumPy greedy NMS (torchvision semantics)."""
import numpy as np
import pytest

from centermask_jax.ops.nms import class_aware_nms, first_k, sort_by_score


def np_greedy_nms(boxes, scores, classes, valid, thr):
  """Reference: per-class greedy NMS (stable score sort), result in global score order."""
  idx = np.nonzero(valid)[0]
  order = idx[np.argsort(-scores[idx], kind="stable")]
  kept = []
  for c in np.unique(classes[idx]):
    ids = order[classes[order] == c]
    b = boxes[ids].astype(np.float32)
    areas = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    suppressed = np.zeros(len(ids), bool)
    for a in range(len(ids)):
      if suppressed[a]:
        continue
      kept.append(ids[a])
      w = np.maximum(0, np.minimum(b[a, 2], b[:, 2]) - np.maximum(b[a, 0], b[:, 0]))
      h = np.maximum(0, np.minimum(b[a, 3], b[:, 3]) - np.maximum(b[a, 1], b[:, 1]))
      inter = w * h
      with np.errstate(invalid="ignore", divide="ignore"):
        iou = inter / (areas[a] + areas - inter)
      suppressed[a + 1:] |= iou[a + 1:] > thr
  rank = np.empty(len(scores), np.int64)
  rank[order] = np.arange(len(order))
  kept = np.asarray(kept, np.int64)
  return kept[np.argsort(rank[kept])]


def random_problem(rng, m, num_classes, span=200.0, tie_levels=50, invalid_frac=0.2):
  xy = rng.uniform(0, span, (m, 2))
  wh = rng.uniform(4, 50, (m, 2))
  wh[rng.uniform(size=m) < 0.03, 0] = 0.0  # a few zero-width boxes
  boxes = np.concatenate([xy, xy + wh], -1).astype(np.float32)
  classes = rng.integers(0, num_classes, m).astype(np.int32)
  dup = rng.uniform(size=m) < 0.1  # exact duplicates (box and class) of other entries
  src = rng.integers(0, m, dup.sum())
  boxes[dup], classes[dup] = boxes[src], classes[src]
  scores = (np.round(rng.uniform(0, 1, m) * tie_levels) / tie_levels).astype(np.float32)
  valid = rng.uniform(size=m) >= invalid_frac
  return boxes, scores, classes, valid


@pytest.mark.parametrize("num_classes,block_size,thr,span",
                         [(5, 16, 0.6, 200.0), (1, 32, 0.5, 200.0), (40, 128, 0.6, 30.0)])
def test_matches_numpy_greedy(num_classes, block_size, thr, span):
  rng = np.random.default_rng(num_classes)
  n, m = 3, 301
  probs = [random_problem(rng, m, num_classes, span) for _ in range(n)]
  boxes, scores, classes, valid = (np.stack(x) for x in zip(*probs))
  order, keep = class_aware_nms(boxes, scores, classes, valid, thr, block_size=block_size)
  order, keep = np.asarray(order), np.asarray(keep)
  assert order.shape == (n, m) and keep.shape == (n, m)
  for i in range(n):
    ref = np_greedy_nms(boxes[i], scores[i], classes[i], valid[i], thr)
    got = order[i][keep[i]]
    assert 10 < len(ref) < valid[i].sum()  # real suppression happened
    np.testing.assert_array_equal(got, ref)
    # order: valid entries first, score descending, ties by input index
    nv = valid[i].sum()
    idx = np.nonzero(valid[i])[0]
    np.testing.assert_array_equal(order[i][:nv], idx[np.argsort(-scores[i][idx], kind="stable")])
    assert not valid[i][order[i][nv:]].any()
    assert not keep[i][nv:].any()


def test_unbatched_and_all_invalid():
  rng = np.random.default_rng(7)
  boxes, scores, classes, valid = random_problem(rng, 50, 3)
  order, keep = class_aware_nms(boxes, scores, classes, valid, 0.6)
  assert order.shape == (50,)
  np.testing.assert_array_equal(np.asarray(order)[np.asarray(keep)],
                                np_greedy_nms(boxes, scores, classes, valid, 0.6))
  _, keep = class_aware_nms(boxes, scores, classes, np.zeros(50, bool), 0.6)
  assert not np.asarray(keep).any()


def test_identical_boxes_same_vs_other_class():
  box = np.array([[10, 10, 20, 20]] * 4, np.float32)
  scores = np.array([0.5, 0.9, 0.9, 0.7], np.float32)
  classes = np.array([1, 1, 2, 1], np.int32)
  order, keep = class_aware_nms(box, scores, classes, np.ones(4, bool), 0.6)
  # sorted: idx1 (0.9, c1), idx2 (0.9, c2, tie -> later), idx3, idx0
  np.testing.assert_array_equal(np.asarray(order), [1, 2, 3, 0])
  np.testing.assert_array_equal(np.asarray(keep), [True, True, False, False])


def test_sort_by_score_and_first_k():
  scores = np.array([0.1, 0.5, 0.5, 0.9, 0.3], np.float32)
  valid = np.array([True, True, True, False, True])
  np.testing.assert_array_equal(np.asarray(sort_by_score(scores, valid)), [1, 2, 4, 0, 3])
  keep = np.array([False, True, True, False, True, False])
  idx, ok = first_k(keep, 2)
  np.testing.assert_array_equal(np.asarray(idx), [1, 2])
  assert np.asarray(ok).all()
  idx, ok = first_k(keep, 5)
  np.testing.assert_array_equal(np.asarray(idx), [1, 2, 4, 0, 0])
  np.testing.assert_array_equal(np.asarray(ok), [True, True, True, False, False])
  idx, ok = first_k(keep, 8)  # k > M pads
  assert idx.shape == (8,) and int(np.asarray(ok).sum()) == 3


def test_no_recompile():
  rng = np.random.default_rng(3)
  a = [np.stack(x) for x in zip(*[random_problem(rng, 64, 4) for _ in range(2)])]
  b = [np.stack(x) for x in zip(*[random_problem(rng, 64, 4) for _ in range(2)])]
  class_aware_nms(*a, 0.6, block_size=16)
  size = class_aware_nms._cache_size()
  order, keep = class_aware_nms(*b, 0.5, block_size=16)
  assert class_aware_nms._cache_size() == size
  for i in range(2):
    np.testing.assert_array_equal(np.asarray(order[i])[np.asarray(keep[i])],
                                  np_greedy_nms(b[0][i], b[1][i], b[2][i], b[3][i], 0.5))


@pytest.mark.parametrize("max_keep,block_size", [(1, 16), (10, 16), (40, 32), (500, 64)])
def test_max_keep_first_survivors_exact(max_keep, block_size):
  """max_keep: the first max_keep survivors in score order equal the full greedy NMS's
  (the walk in score order stops early); 500 > any survivor count = the full result."""
  rng = np.random.default_rng(11)
  n, m = 3, 301
  probs = [random_problem(rng, m, 5, 120.0) for _ in range(n)]
  boxes, scores, classes, valid = (np.stack(x) for x in zip(*probs))
  order, keep = class_aware_nms(boxes, scores, classes, valid, 0.6, block_size=block_size,
                                max_keep=max_keep)
  order, keep = np.asarray(order), np.asarray(keep)
  for i in range(n):
    ref = np_greedy_nms(boxes[i], scores[i], classes[i], valid[i], 0.6)
    got = order[i][keep[i]]
    assert len(got) >= min(max_keep, len(ref))
    np.testing.assert_array_equal(got[:max_keep], ref[:max_keep])
    if max_keep >= len(ref):
      np.testing.assert_array_equal(got, ref)
  # the early stop really skips blocks: with max_keep=1 only the first block is decided
  if max_keep == 1:
    assert keep.sum() < n * 40
