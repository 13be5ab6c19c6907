"""ops/padding.py: the official-region rule against NumPy crops of the official tensors."""
import numpy as np
import tensorflow as tf

from centermask_jax.ops import padding


def test_padded_and_map_sizes_any_array_type():
  hw = np.array([[600, 901], [32, 33]], np.int32)
  want = np.array([[608, 928], [32, 64]])
  np.testing.assert_array_equal(padding.official_padded_hw(hw), want)
  np.testing.assert_array_equal(padding.official_padded_hw(tf.constant(hw)).numpy(), want)
  assert padding.official_padded_hw(601) == 608
  assert padding.round_up(129, 128) == 256
  # ceil(Hp / s): what conv (k3 p1) / ceil-mode pooling arithmetic gives on the official map
  np.testing.assert_array_equal(padding.official_map_hw(want, 128), [[5, 8], [1, 1]])


def test_region_mask_and_flat_layout():
  phw = np.array([[64, 96], [128, 32]])
  m = np.asarray(padding.region_mask(phw, (4, 8), 32))
  assert m.shape == (2, 4, 8, 1) and m.dtype == np.float32
  want = np.zeros((2, 4, 8), np.float32)
  want[0, :2, :3] = 1
  want[1, :4, :1] = 1
  np.testing.assert_array_equal(m[..., 0], want)
  flat = np.asarray(padding.region_flat(phw, [(4, 8), (2, 4)], [32, 64]))
  lvl1 = np.zeros((2, 2, 4), bool)
  lvl1[0, :1, :2] = True
  lvl1[1, :2, :1] = True
  np.testing.assert_array_equal(flat, np.concatenate(
      [want.reshape(2, -1) > 0, lvl1.reshape(2, -1)], axis=1))
  hwm = np.asarray(padding.hw_mask(np.array([[[2, 3]]]), (4, 5)))
  assert hwm.shape == (1, 1, 4, 5) and hwm.sum() == 6 and hwm[0, 0, :2, :3].all()


def test_masked_statistics_equal_statistics_of_the_crop():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 7, 8)).astype(np.float32)
  x[0, 3:] = 1e6  # garbage outside the region must not matter
  x[1, :, 5:] = -1e6
  mask = np.zeros((2, 6, 7, 1), np.float32)
  mask[0, :3, :7] = 1
  mask[1, :6, :5] = 1
  crops = [x[0, :3, :7], x[1, :6, :5]]
  mean = np.asarray(padding.masked_mean(x, mask))
  for i, c in enumerate(crops):
    np.testing.assert_allclose(mean[i, 0, 0], c.mean(axis=(0, 1)), rtol=1e-5)
  xm, gm, gv, count = padding.masked_group_stats(x, mask, 4)
  assert xm.shape == (2, 42, 8) and gm.shape == gv.shape == (2, 1, 8)
  np.testing.assert_array_equal(np.asarray(count).reshape(2), [3 * 7 * 2, 6 * 5 * 2])
  for i, c in enumerate(crops):
    g = c.reshape(c.shape[0], c.shape[1], 4, 2).astype(np.float64)
    want_mean = np.repeat(g.mean(axis=(0, 1, 3)), 2)  # each channel holds its group's
    want_var = np.repeat(g.var(axis=(0, 1, 3)), 2)
    np.testing.assert_allclose(np.asarray(gm)[i, 0], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gv)[i, 0], want_var, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(padding.apply_mask(x, mask))[0, 3:], 0.0)
