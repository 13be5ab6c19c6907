"""FREEZE_AT: the backbone stops the gradient above its frozen stages (no backward work
below them; frozen parameters get exact zero gradients, the others unchanged)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from centermask_jax.config import base_config, lite, resnet, vovnet
from centermask_jax.models import vovnet as vov
from centermask_jax.models.centermask import build_bottom_up
from centermask_jax.ops import kernels
from centermask_jax.training import optimizer as O
from fast_init import jit_init


def _bottom_up_loss(module, names):
  def loss(params, frozen_bn, x, phw):
    feats = module.apply({"params": params, "frozen_bn": frozen_bn}, x, phw)
    return sum(jnp.sum(feats[k] * (i + 1.0)) for i, k in enumerate(names))
  return loss


def _count_convs(jaxpr) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == "conv_general_dilated"
    for p in eqn.params.values():
      if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
        n += _count_convs(p.jaxpr)
      elif hasattr(p, "eqns"):
        n += _count_convs(p)
  return n


def test_resnet_freeze_at_2_drops_the_backward_of_stem_and_res2(monkeypatch):
  """R-50 gradient program (traced only): FREEZE_AT=2 removes exactly the 11 weight
  gradients and 10 input gradients of the stem + res2 convs (the stem input has none) and
  the input gradients of res3.0's conv1 and shortcut (their input is res2's output)."""
  # count XLA conv gradients (ops/kernels.py may compute them as matmuls per backend)
  monkeypatch.setattr(kernels, "DENSE_IMPL", {})
  counts = {}
  for freeze_at in (0, 2):
    c = base_config()
    resnet(c, 50)
    c.model.backbone.freeze_at = freeze_at
    module, names = build_bottom_up(c.model.backbone)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    phw = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    v = jax.eval_shape(module.init, jax.random.PRNGKey(0), x, phw)
    loss = _bottom_up_loss(module, names)
    args = (v["params"], v["frozen_bn"], x, phw)
    fwd = _count_convs(jax.make_jaxpr(loss)(*args).jaxpr)
    counts[freeze_at] = _count_convs(jax.make_jaxpr(jax.grad(loss))(*args).jaxpr)
    assert fwd == 53
  assert counts[0] == 53 * 3 - 1
  assert counts[0] - counts[2] == 11 + 10 + 2


def test_vovnet_freeze_grads_zero_below_and_unchanged_above(monkeypatch):
  """V-19-slim-DW, FREEZE_AT=2 (stem + stage2, centermask2's _freeze_backbone): gradients
  of the optimiser's frozen leaves are exactly 0, every other gradient equals the
  FREEZE_AT=0 gradient; the forward outputs are identical."""
  # XLA's conv gradients are bit-identical across the two programs; the CPU rewrites of
  # ops/kernels.py (shifted depthwise, matmul gradients) round differently when XLA
  # fuses the two programs differently, so this test runs the plain XLA convs.
  monkeypatch.setattr(kernels, "DENSE_IMPL", {})
  monkeypatch.setattr(kernels, "DEPTHWISE_IMPL", {})
  assert vov.frozen_param_prefixes(0) == ()
  assert vov.frozen_param_prefixes(2) == ("stem.", "stage2.")
  grads, outs = {}, {}
  r = np.random.RandomState(0)
  x = jnp.asarray(r.randn(1, 64, 96, 3).astype(np.float32))
  phw = jnp.asarray([[64, 64]], jnp.int32)
  v = shapes = None
  for freeze_at in (0, 2):
    c = base_config()
    lite(c)
    vovnet(c, "V-19-slim-dw-eSE")
    c.model.backbone.freeze_at = freeze_at
    module, names = build_bottom_up(c.model.backbone)
    # One jitted init for both (eagerly ~300 primitive compiles): freeze_at only stops
    # gradients in the forward, so both modules create the same variables (same names and
    # shapes, checked) from the same key, hence the same values.
    if v is None:
      v = jit_init(module, jax.random.PRNGKey(1), x, phw)
      shapes = jax.eval_shape(lambda: v)
    assert jax.eval_shape(module.init, jax.random.PRNGKey(1), x, phw) == shapes
    loss = _bottom_up_loss(module, names)
    outs[freeze_at], grads[freeze_at] = jax.jit(jax.value_and_grad(loss))(
        v["params"], v["frozen_bn"], x, phw)
    labels = O.param_labels({"backbone": {"bottom_up": v["params"]}}, c)
  assert float(outs[0]) == float(outs[2])
  flat_l = traverse_util.flatten_dict(labels["backbone"]["bottom_up"])
  g0, g2 = (traverse_util.flatten_dict(grads[k]) for k in (0, 2))
  frozen = [k for k, l in flat_l.items() if l == "frozen"]
  assert frozen and all(k[0].startswith(("stem.", "stage2.")) for k in frozen)
  assert len(frozen) < len(flat_l)
  for k in flat_l:
    if flat_l[k] == "frozen":
      assert not np.asarray(g2[k]).any(), k
      assert np.asarray(g0[k]).any(), k  # would have had a gradient
    else:
      np.testing.assert_array_equal(np.asarray(g2[k]), np.asarray(g0[k]), err_msg=str(k))
