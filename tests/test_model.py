"""Model construction for every config: value counts vs official key listings, a forward
pass on a small image, strict checkpoint import errors, and no recompilation."""
import glob
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax.checkpoints import official
from centermask_jax.config import load_config
from centermask_jax.models.centermask import CenterMask, count_values
from centermask_jax.training import trainer
from fast_init import jit_init
from test_parity import configs_run_here

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "centermask_*.py")))
KEYS_DIR = REPO.parent / "shared" / "fixtures" / "state_dict_keys"


def _listing(name):
  path = KEYS_DIR / f"{name}.tsv"
  if not path.exists():
    return None
  rows = [l.split("\t") for l in path.read_text().splitlines()[1:] if l.strip()]
  return {r[0]: tuple(int(v) for v in r[1].strip("()").split(",") if v.strip()) for r in rows}


def _shapes(model):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))


def test_fifteen_configs_exist():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert len(names) == 15, names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_value_count_and_keys_match_listing(path):
  cfg = load_config(path)
  listing = _listing(cfg.name)
  if listing is None:
    if not KEYS_DIR.exists():
      pytest.skip("state_dict_keys not available")
    assert cfg.name == "centermask_lite_R_50_FPN_ms_4x"  # the only config without a listing
    pytest.skip("no official listing for this config")
  shapes = _shapes(CenterMask(cfg))
  ours = official.expected_keys(shapes)
  assert set(ours) == set(listing), (sorted(set(listing) - set(ours))[:10],
                                     sorted(set(ours) - set(listing))[:10])
  assert count_values(shapes) == sum(int(np.prod(s)) for s in listing.values())
  for key, shape in listing.items():  # element counts per tensor equal too
    assert int(np.prod(ours[key])) == int(np.prod(shape)), key


# Twins of a config whose forward runs here (same modules, more blocks or fewer channels):
# their keys and counts are checked above on every run; their forward (a full compile
# each) only with CENTERMASK_JAX_SLOW_TESTS=1, to keep CI within its budget.
TWINS = {"centermask_V_57_eSE_FPN_ms_3x", "centermask_V_99_eSE_FPN_ms_3x",  # of V-39
         # of V-39, with the deformable stages 3-5 that test_dcn_models runs (forward on two
         # canvases, a training step, the official import) on a small DCN VoVNet
         "centermask_V_39_eSE_dcn_FPN_ms_3x",
         "centermask_V_57_eSE_dcn_FPN_ms_3x", "centermask_V_99_eSE_dcn_FPN_ms_3x",
         "centermask_R_101_FPN_ms_3x",  # of R-50
         # of R-50; its ResNeXt blocks against torch in test_backbones_resnet_mobilenet
         "centermask_X_101_FPN_ms_3x",
         "centermask_lite_R_50_FPN_ms_4x",  # backbone of R-50, heads of the Lite parity configs
         "centermask_lite_V_39_eSE_FPN_ms_4x",  # of Lite V-19 (backbone: of V-39)
         "centermask_lite_V_19_slim_eSE_FPN_ms_4x"}  # of Lite V-19


# Configs whose eval parity test_parity runs (the Lite fixtures' here) get their shapes
# checked by `eval_shape`: the parity test runs the same forward against the reference.
# Each config drops its programs after it: its variables come from one compiled init
# program (`trainer.random_variables`) and its forward is its own compile, so the next config
# would reuse neither; the suite's memory then holds one config's programs at most.
@pytest.mark.drop_programs
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.basename(p)[:-3])
def test_forward_small_image(path):
  """predict on a 128x128 canvas: output shapes, finite scores, and a second image of
  another size on the same canvas runs the same compiled program."""
  if (os.path.basename(path)[:-3] in TWINS
      and os.environ.get("CENTERMASK_JAX_SLOW_TESTS") != "1"):
    pytest.skip("twin of a tested config; CENTERMASK_JAX_SLOW_TESTS=1 runs it")
  cfg = load_config(path)
  model = CenterMask(cfg)
  images = jax.random.normal(jax.random.PRNGKey(1), (1, 128, 128, 3)) * 50
  args = (images, jnp.array([[100, 120]]), jnp.array([[128, 128]]))
  if os.path.basename(path)[:-3] in configs_run_here():  # test_parity runs its forward
    out = jax.eval_shape(model.predict, _shapes(model), *args)
  else:
    variables = trainer.random_variables(model, jax.random.PRNGKey(0))
    traces = []

    @jax.jit
    def predict(v, x, ihw, phw):
      traces.append(1)
      return model.predict(v, x, ihw, phw)
    out = predict(variables, *args)
    assert np.all(np.isfinite(np.asarray(out["mask_scores"])))
    again = predict(variables, images[:, ::-1] * 0.5, jnp.array([[128, 96]]), args[2])
    assert np.all(np.isfinite(np.asarray(again["mask_scores"]))) and len(traces) == 1
  k = cfg.model.fcos.post_nms_topk_test
  assert out["boxes"].shape == (1, k, 4)
  assert out["mask_probs"].shape == (1, k, 28, 28)
  assert out["maskiou"].shape == (1, k, cfg.model.num_classes)


def _lite_model():
  cfg = load_config(str(REPO / "configs" / "centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x.py"))
  return CenterMask(cfg)


def test_import_reports_missing_unexpected_and_shape_keys():
  model = _lite_model()
  shapes = _shapes(model)
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  sd = official.export_state_dict(jax.tree_util.tree_map(
      lambda s: np.random.RandomState(0).randn(*s.shape).astype(np.float32), shapes))
  # a correct state dict round-trips exactly
  back = official.load_into(variables, sd)
  assert official.export_state_dict(back).keys() == sd.keys()
  for k, v in official.export_state_dict(back).items():
    np.testing.assert_array_equal(v, sd[k])
  del sd["roi_heads.mask_head.deconv.bias"]
  sd["roi_heads.mask_head.extra.weight"] = np.zeros(3, np.float32)
  sd["proposal_generator.fcos_head.cls_logits.weight"] = np.zeros((81, 128, 3, 3), np.float32)
  with pytest.raises(official.CheckpointMismatchError) as e:
    official.load_into(variables, sd)
  msg = str(e.value)
  assert "roi_heads.mask_head.deconv.bias" in msg and "missing" in msg
  assert "roi_heads.mask_head.extra.weight" in msg and "unexpected" in msg
  assert "proposal_generator.fcos_head.cls_logits.weight" in msg and "(81, 128, 3, 3)" in msg


def test_layout_conversions_match_torch_modules():
  """Deconv and MaskIoU fc1 layouts: our modules with imported weights equal torch's ops."""
  torch = pytest.importorskip("torch")
  model = _lite_model()
  shapes = _shapes(model)
  rng = np.random.RandomState(0)
  sd = {k: rng.randn(*v).astype(np.float32) * 0.05
        for k, v in official.expected_keys(
            jax.tree_util.tree_map(lambda s: s, shapes)).items()}
  # expected_keys gives our shapes; build torch-layout tensors via from_ours
  sd = {k: official.from_ours(k, v) for k, v in sd.items()}
  variables = official.load_into(jax.tree_util.tree_map(
      lambda s: np.zeros(s.shape, s.dtype), shapes), sd)
  pooled = rng.randn(3, 14, 14, 128).astype(np.float32)
  mask = rng.rand(3, 28, 28).astype(np.float32)
  ours = np.asarray(model.maskiou(variables, jnp.asarray(pooled)[None], jnp.asarray(mask)[None]))[0]
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  x = torch.cat([t(pooled.transpose(0, 3, 1, 2)),
                 torch.nn.functional.max_pool2d(t(mask[:, None]), 2, 2)], 1)
  p = "roi_heads.maskiou_head."
  x = torch.relu(torch.nn.functional.conv2d(x, t(sd[p + "maskiou_fcn1.weight"]),
                                            t(sd[p + "maskiou_fcn1.bias"]), padding=1))
  x = torch.relu(torch.nn.functional.conv2d(x, t(sd[p + "maskiou_fcn2.weight"]),
                                            t(sd[p + "maskiou_fcn2.bias"]), stride=2, padding=1))
  x = x.flatten(1)
  for name in ("maskiou_fc1", "maskiou_fc2"):
    x = torch.relu(torch.nn.functional.linear(x, t(sd[p + name + ".weight"]), t(sd[p + name + ".bias"])))
  ref = torch.nn.functional.linear(x, t(sd[p + "maskiou.weight"]), t(sd[p + "maskiou.bias"])).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
  # deconv
  feats = rng.randn(2, 14, 14, 128).astype(np.float32)
  from centermask_jax.models.mask_head import Deconv2x2
  w = sd["roi_heads.mask_head.deconv.weight"]
  b = sd["roi_heads.mask_head.deconv.bias"]
  ours = Deconv2x2(128).apply({"params": {"kernel": official.to_ours(
      "roi_heads.mask_head.deconv.weight", w, (2, 2, 128, 128)), "bias": b}}, feats)
  ref = torch.nn.functional.conv_transpose2d(t(feats.transpose(0, 3, 1, 2)), t(w), t(b), stride=2)
  np.testing.assert_allclose(np.asarray(ours).transpose(0, 3, 1, 2), ref.numpy(), rtol=1e-4, atol=1e-4)


def test_vovnet_gn_backbone_is_padding_exact_and_named_like_detectron2():
  """model.backbone.norm='GN': trainable GroupNorm (gcd(32, C) groups) with statistics over
  the official region: a 96x96 image inside a 128x128 canvas with garbage outside gives
  the same features (inside the region) as the 96x96 image alone."""
  from centermask_jax.checkpoints import official
  from centermask_jax.models.vovnet import VoVNet
  net = VoVNet("V-19-slim-dw-eSE", norm="GN")
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 96, 96, 3))) * 50
  big = np.full((1, 128, 128, 3), 300.0, np.float32)
  big[:, :96, :96] = x
  hw = jnp.array([[96, 96]], jnp.int32)
  # jitted init and forward: eagerly, every primitive was its own XLA compile (~740)
  v = jit_init(net, jax.random.PRNGKey(1), x, hw)
  assert set(v) == {"params"}  # no frozen buffers
  v = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1 * np.random.default_rng(0).normal(
      size=a.shape).astype(np.float32), v)  # non-trivial GN affine parameters
  run = jax.jit(net.apply)
  small_out, big_out = run(v, x, hw), run(v, big, hw)
  for name, stride in (("stem", 4), ("stage3", 8), ("stage5", 32)):
    s = 96 // stride
    a, b = np.asarray(small_out[name]), np.asarray(big_out[name])[:, :s, :s]
    scale = float(np.abs(a).max())
    assert scale > 0
    np.testing.assert_allclose(b, a, atol=1e-4 * scale, err_msg=name)
  keys = official.expected_keys({"params": {"backbone": {"bottom_up": v["params"]}}})
  assert "backbone.bottom_up.stage2.OSA2_1.concat.OSA2_1_concat/norm.weight" in keys
  assert keys["backbone.bottom_up.stage3.OSA3_1.layers.0.OSA3_1_0/pw_norm.bias"] == (80,)
  c = load_config(CONFIGS[0])
  c.model.backbone.name, c.model.backbone.norm = "resnet", "GN"
  with pytest.raises(ValueError, match="only supported for VoVNet"):
    CenterMask(c).init(jax.random.PRNGKey(0))


def test_ese_hsigmoid_matches_pytorch_values_and_gradients():
  """eSE gate = relu6(x + 3) / 6: bit-equal to PyTorch's float32 forward (true division,
  not a reciprocal multiply) and its gradient, which is 0 at the clip edges x = +-3."""
  torch = pytest.importorskip("torch")
  from centermask_jax.models.vovnet import hsigmoid
  x = np.concatenate([np.float32([-3.0, 3.0, -3.5, 3.5, 0.0]),
                      np.random.default_rng(0).normal(0, 2.5, 20000).astype(np.float32)])
  xt = torch.from_numpy(x.copy()).requires_grad_(True)
  yt = torch.nn.functional.relu6(xt + 3.0) / 6.0
  yt.sum().backward()
  y, g = jax.jit(jax.vmap(jax.value_and_grad(hsigmoid)))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy())
  np.testing.assert_array_equal(np.asarray(g), xt.grad.numpy())
  assert np.asarray(g)[:2].tolist() == [0.0, 0.0]
