"""The V-39/57/99-eSE-DCN configs: DCN layer structure and naming, strict import of a
`.pth` written from the official key listing, and a training step through the
deformable layers. (Value counts vs the listings and a forward pass on a small image
are in test_model.py, parametrized over every config.)"""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from centermask_jax import parallel
from centermask_jax.checkpoints import official
from centermask_jax.config import load_config
from centermask_jax.models.centermask import CenterMask
from conftest import REPO, STATE_DICT_KEYS, require
from fast_init import jit_init

DCN_CONFIGS = ["centermask_V_39_eSE_dcn_FPN_ms_3x", "centermask_V_57_eSE_dcn_FPN_ms_3x",
               "centermask_V_99_eSE_dcn_FPN_ms_3x"]


def _listing(name):
  rows = [l.split("\t") for l in require(STATE_DICT_KEYS / f"{name}.tsv").read_text()
          .splitlines()[1:] if l.strip()]
  return {r[0]: tuple(int(v) for v in r[1].strip("()").split(",") if v.strip()) for r in rows}


def _model(name):
  return CenterMask(load_config(str(REPO / "configs" / f"{name}.py")))


@pytest.mark.parametrize("name", DCN_CONFIGS)
def test_dcn_layers_exactly_in_stages_3_to_5(name):
  """Every 3x3 OSA layer of stages 3-5 (and none of stage 2) has conv_offset [27, in, 3, 3]
  + bias, a bias-free deformable conv [stage_ch, in, 3, 3] and a norm, as the listing."""
  listing = _listing(name)
  ours = official.expected_keys(jax.eval_shape(lambda: _model(name).init(
      jax.random.PRNGKey(0))))
  offs = sorted(k for k in ours if "/conv_offset." in k)
  assert offs == sorted(k for k in listing if "/conv_offset." in k)
  stages = {int(re.search(r"stage(\d)", k).group(1)) for k in offs}
  assert stages == {3, 4, 5}
  for k in offs:
    if k.endswith(".weight"):
      layer = k[:-len("/conv_offset.weight")]
      assert listing[k][0] == 27 and listing[k][2:] == (3, 3)
      assert listing[layer + "/conv.weight"][1:] == listing[k][1:2] + (3, 3)
      assert layer + "/conv.bias" not in listing and layer + "/conv.bias" not in ours
      assert ours[layer + "/conv.weight"] == (3, 3) + listing[k][1:2] + (
          listing[layer + "/conv.weight"][0],)  # HWIO
  assert not any("stage2" in k and "offset" in k for k in ours)


def _write_pth(path, listing, rng):
  """A centermask2-style checkpoint {"model": state_dict} from a key listing: random
  values for the DCN tensors, a distinct constant per key elsewhere (stored as a
  1-element expanded tensor, so the file stays small)."""
  import torch
  sd, ref = {}, {}
  dcn_layers = {k.split("/conv_offset.")[0] for k in listing if "/conv_offset." in k}
  for i, (key, shape) in enumerate(sorted(listing.items())):
    if key.split("/")[0] in dcn_layers:  # conv_offset.{weight,bias}, conv.weight, norm.*
      a = rng.standard_normal(shape).astype(np.float32)
      sd[key] = torch.from_numpy(a)
      ref[key] = a
    else:
      sd[key] = torch.full((1,) * len(shape), float(i)).expand(*shape)
      ref[key] = np.float32(i)
  torch.save({"model": sd, "iteration": 0}, path)
  return ref


def test_official_pth_import_strict_by_name(tmp_path):
  """V-39-DCN: a .pth written from the listing imports strictly; DCN tensors land
  transposed OIHW -> HWIO; every other leaf holds its own key's value; a missing and an
  unexpected DCN key are both named."""
  pytest.importorskip("torch")
  name = DCN_CONFIGS[0]
  listing = _listing(name)
  ref = _write_pth(tmp_path / "m.pth", listing, np.random.default_rng(0))
  shapes = jax.eval_shape(lambda: _model(name).init(jax.random.PRNGKey(0)))
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  loaded = official.import_checkpoint(template, str(tmp_path / "m.pth"))
  flat = {official.torch_key(p): np.asarray(v)
          for p, v in official.flatten_variables(loaded).items()}
  assert set(flat) == set(listing)
  n_dcn = 0
  for key, value in flat.items():
    if isinstance(ref[key], np.ndarray):
      n_dcn += 1
      want = ref[key].transpose(2, 3, 1, 0) if ref[key].ndim == 4 else ref[key]
      np.testing.assert_array_equal(value, want, err_msg=key)
    else:
      assert np.all(value == ref[key]), key
  assert n_dcn == 7 * 25  # 25 DCN layers in V-39 stages 3-5: offset w/b, conv, 4 FrozenBN
  # strict: a missing and an unexpected key are named
  import torch
  sd = torch.load(tmp_path / "m.pth", weights_only=True)["model"]
  k = "backbone.bottom_up.stage4.OSA4_2.layers.3.OSA4_2_3/conv_offset.bias"
  sd[k.replace("conv_offset", "conv")] = sd.pop(k)
  torch.save(sd, tmp_path / "bad.pth")
  with pytest.raises(official.CheckpointMismatchError) as e:
    official.import_checkpoint(template, str(tmp_path / "bad.pth"))
  msg = str(e.value)
  assert "1 missing" in msg and k in msg
  assert "1 unexpected" in msg and k.replace("conv_offset", "conv") in msg


# ------------------------------------------------------- small DCN model (shared compiles)
def _tiny_dcn_config():
  from test_train import tiny_config
  from centermask_jax.config import vovnet
  c = tiny_config()
  vovnet(c, "V-19-slim-eSE", dcn=True)
  c.train.global_batch = 1
  return c


def _perturb_offsets(params, scale, seed=0):
  """Random conv_offset weights so that offsets reach several pixels (init is zero)."""
  rng = np.random.default_rng(seed)

  def f(path, leaf):
    names = [getattr(p, "key", "") for p in path]
    if any(str(n).endswith(":conv_offset") for n in names):
      return jnp.asarray(rng.standard_normal(leaf.shape).astype(np.float32) * scale)
    return leaf
  return jax.tree_util.tree_map_with_path(f, params)


def test_dcn_backbone_same_numbers_on_larger_canvas():
  """VoVNet with DCN in stages 3-5 and offsets of several pixels: a 64x96 official input
  inside a 128x128 canvas gives the official stage3-5 maps in the region."""
  from centermask_jax.models.vovnet import VoVNet
  net = VoVNet("V-19-slim-eSE", stage_with_dcn=(False, True, True, True))
  rng = np.random.default_rng(1)
  img = rng.standard_normal((1, 64, 96, 3)).astype(np.float32)
  # jitted init: eagerly, every primitive was its own XLA compile (~500)
  v = jit_init(net, jax.random.PRNGKey(0), jnp.zeros((1, 128, 128, 3)),
               jnp.array([[128, 128]]))
  v = {**v, "params": _perturb_offsets(v["params"], 0.3)}
  run = jax.jit(net.apply)
  small = run(v, jnp.asarray(img), jnp.array([[64, 96]]))
  canvas = np.zeros((1, 128, 128, 3), np.float32)
  canvas[:, :64, :96] = img
  big = run(v, jnp.asarray(canvas), jnp.array([[64, 96]]))
  for name, stride in (("stage3", 8), ("stage4", 16), ("stage5", 32)):
    a = np.asarray(small[name])
    b = np.asarray(big[name])[:, :a.shape[1], :a.shape[2]]
    assert a.shape[1:3] == (64 // stride, 96 // stride)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=name)


def test_training_step_updates_deformable_layers():
  """One SGD step of a small DCN CenterMask: finite loss, and the offset convs (zero at
  init) and the deformable kernels of stages 3-5 receive gradient and move."""
  from centermask_jax.training import optimizer as O
  from centermask_jax.training import step as S, trainer
  from test_train import make_batch, split
  c = _tiny_dcn_config()
  model = CenterMask(c)
  v = trainer.random_variables(model, jax.random.PRNGKey(0))
  devices = jax.local_devices()[:1]
  tx = O.make_optimizer(c, v["params"])
  p_step = S.make_train_step(model, c, tx, O.lr_schedule(c), devices=devices)
  state = parallel.replicate(S.init_state(v["params"], v["frozen_bn"], tx), devices)
  batch = split(make_batch(1, 3), 1)
  state, m = p_step(state, batch, jax.random.PRNGKey(0))
  assert np.isfinite(float(m["total_loss"][0]))
  before = official.export_state_dict(v)
  after = official.export_state_dict(jax.tree_util.tree_map(lambda x: np.asarray(x[0]),
                                                            {"params": state["params"],
                                                             "frozen_bn": v["frozen_bn"]}))
  dcn_keys = [k for k in before if "/conv_offset." in k or (
      "/conv.weight" in k and k.replace("/conv.weight", "/conv_offset.weight") in before)]
  assert len(dcn_keys) == 3 * 3 * 3  # stages 3-5 x 3 layers x (offset w, offset b, conv)
  for k in dcn_keys:
    assert np.max(np.abs(after[k] - before[k])) > 0, k
