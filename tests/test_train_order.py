"""Train record order (issue 12.4): batch k computed directly equals detectron2's
aspect-ratio grouping walked record by record over the epoch-seeded stream, for any k, in
time independent of k."""
import time

import numpy as np
import pytest

from centermask_jax.data import train_order


def _walk(groups, seed, batch, num_batches):
  """Reference: the endless stream epoch 0, 1, ... (default_rng([seed, e]).permutation),
  each record appended to its group's bucket, a full bucket emitted (detectron2's
  AspectRatioGroupedDataset), one record at a time."""
  buckets, out, e = {0: [], 1: []}, [], 0
  while len(out) < num_batches:
    for r in np.random.default_rng([seed, e]).permutation(len(groups)):
      g = int(groups[r])
      buckets[g].append(int(r))
      if len(buckets[g]) == batch:
        out.append((buckets[g], g))
        buckets[g] = []
        if len(out) == num_batches:
          break
    e += 1
  return out


@pytest.mark.parametrize("n0,n1,batch,seed", [
    (23, 17, 4, 0),    # batches straddle epoch ends in both groups
    (3, 30, 8, 5),     # a group smaller than a batch: one batch spans several epochs
    (0, 12, 4, 1),     # one group empty
    (40, 0, 3, 2),
    (7, 9, 1, 3),
])
def test_batches_equal_record_by_record_grouping(n0, n1, batch, seed):
  groups = np.random.default_rng(seed + 100).permutation(np.r_[np.zeros(n0), np.ones(n1)])
  order = train_order.TrainOrder(groups, seed, batch)
  n = 150
  ref = _walk(groups, seed, batch, n)
  got = [order.batch_records(k) for k in range(n)]
  for k, ((r_rec, r_g), (g_rec, g_g)) in enumerate(zip(ref, got)):
    assert g_g == r_g and g_rec.tolist() == r_rec, k
  # random access (any order, fresh object: no state carried between steps)
  fresh = train_order.TrainOrder(groups, seed, batch)
  for k in (149, 0, 77, 3, 120):
    rec, g = fresh.batch_records(k)
    assert rec.tolist() == ref[k][0] and g == ref[k][1]
  # epoch e holds sum_g floor(e * N_g / batch) batches before it
  for e in range(6):
    assert order.batches_before_epoch(e) == sum((e * m) // batch for m in (n0, n1))


def test_step_1e6_is_as_fast_as_step_0_and_consistent():
  """COCO-sized index (117k usable records, batch 16): step 10^6 (epoch ~137) in well under
  a second; it is the next batch after step 10^6 - 1 in the same epoch's stream."""
  rng = np.random.default_rng(0)
  groups = (rng.random(117266) < 0.25).astype(np.int64)
  order = train_order.TrainOrder(groups, 7, 16)
  t = time.perf_counter()
  rec, g = order.batch_records(10 ** 6)
  dt = time.perf_counter() - t
  assert dt < 2.0, dt
  assert (groups[rec] == g).all() and len(set(rec.tolist())) == 16
  e = order.epoch_of_step(10 ** 6)
  assert order.batches_before_epoch(e) <= 10 ** 6 < order.batches_before_epoch(e + 1)
  assert e == pytest.approx(10 ** 6 * 16 / len(groups), abs=2)
  # reference: walk epoch e record by record from its start, whose buckets hold the last
  # (e * N_g) % 16 group-g records of epoch e - 1
  perm = lambda ep: np.random.default_rng([7, ep]).permutation(len(groups))
  prev = perm(e - 1)
  buckets = {}
  for gg in (0, 1):
    left = (e * int((groups == gg).sum())) % 16
    buckets[gg] = [int(r) for r in prev[groups[prev] == gg]][len(prev[groups[prev] == gg]) - left:]
  k = sum((e * int((groups == gg).sum())) // 16 for gg in (0, 1))
  want = {}
  for r in perm(e):
    gg = int(groups[r])
    buckets[gg].append(int(r))
    if len(buckets[gg]) == 16:
      if k >= 10 ** 6 - 2:
        want[k] = (buckets[gg], gg)
      buckets[gg], k = [], k + 1
      if k > 10 ** 6 + 2:
        break
  for k in range(10 ** 6 - 2, 10 ** 6 + 3):
    got_rec, got_g = order.batch_records(k)
    assert (got_rec.tolist(), got_g) == want[k], k


def test_no_usable_record_is_refused():
  with pytest.raises(ValueError, match="no usable train image"):
    train_order.TrainOrder(np.zeros(0), 0, 4)
