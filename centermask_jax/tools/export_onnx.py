"""ONNX export of the whole inference through jax2onnx (optional extra `export`).

The jitted inference is first traced to a jaxpr (so jax2onnx's flax/jnp patches never see
our modules), then re-evaluated primitive by primitive with a few rewrites that keep the
values and make the graph convertible and runnable by onnxruntime:
  * nested jit / custom_jvp calls are inlined; while / cond bodies are rewritten too;
  * scatter-add with batching dimensions (RoIAlign's bilinear weight rows) becomes a
    one-hot sum (jax2onnx has no lowering for that scatter pattern);
  * NHWC max pooling becomes a max of strided slices (onnxruntime rejects the MaxPool
    kernel jax2onnx emits for it);
  * depthwise convs are traced as XLA's grouped conv (ONNX Conv with group = C), not as
    the CPU training rewrite's k*k shifted multiply-adds (ops/kernels.py), which
    onnxruntime would round once per Mul and Add;
  * gathers / selects / scatters of bool arrays run on uint8 (onnxruntime's CPU `Where`
    has no bool kernel).
After conversion the graph outputs get back the shapes of the JAX outputs where the
converter's reshape folding changed them (`restore_output_shapes`).
The result is one self-contained ONNX graph (weights inside; repeated and uniform
initializers merged afterwards) with the same signature as the StableHLO artefact
(tools/export.py), NMS and top-k included. Run it with `centermask_jax.serving`.
"""
import contextlib
import importlib.metadata
import logging
import os
import sys
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jcore

from centermask_jax.ops import kernels


@contextlib.contextmanager
def _quiet_jax2onnx():
  """jax2onnx logs a warning with a traceback for each of its plugins whose library
  (equinox, dm-pix, ...) is not installed; those plugins are not used here."""
  log = logging.getLogger("jax2onnx")
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


@contextlib.contextmanager
def _fast_output_check():
  """jax2onnx 0.17.1 checks after each lowered equation that its outputs are connected to
  the graph by scanning every node built so far (quadratic: ~2/3 of the Lite export time).
  Shortcut: a value whose producing node belongs to the graph being built is connected
  (onnx_ir keeps node.graph in step with the graph's node list); every other value still
  gets the full check. Checked on the Lite model: the same nodes, attributes and
  initializers as without it, export 96 s instead of 204 s (loaded 2-core CPU)."""
  from jax2onnx.converter import output_binding as ob
  orig = getattr(ob, "_value_is_graph_connected", None)
  if orig is None:  # another jax2onnx version: nothing to speed up
    yield
    return

  def connected(ctx, value):
    producer = value.producer() if value is not None else None
    if producer is not None and producer.graph is ctx.builder.nodes:
      return True
    return orig(ctx, value)

  ob._value_is_graph_connected = connected
  try:
    yield
  finally:
    ob._value_is_graph_connected = orig


try:
  with _quiet_jax2onnx():
    import jax2onnx
except ImportError as e:  # exercised when the extra is missing
  raise ImportError("ONNX export needs the `export` extra and jax2onnx: pip install -e "
                    "'.[export]' && pip install --no-deps jax2onnx==0.17.1 "
                    f"({e})") from e

OPSET = 23  # jax2onnx's default
JAX2ONNX_VERSION = "0.17.1"  # installed with --no-deps (see pyproject.toml's `export` extra)


def _is_bool(x):
  return getattr(x, "dtype", None) == jnp.bool_


def _scatter_add_onehot(eqn, operand, indices, updates):
  """Batched scatter-add of scalars into the last axis -> None if not that pattern."""
  dn = eqn.params["dimension_numbers"]
  nb = len(dn.operand_batching_dims)
  if (nb == 0 or dn.update_window_dims or tuple(dn.operand_batching_dims) != tuple(range(nb))
      or tuple(dn.scatter_indices_batching_dims) != tuple(range(nb))
      or tuple(dn.inserted_window_dims) != (operand.ndim - 1,) or operand.ndim != nb + 1
      or indices.shape[-1] != 1):
    return None
  c = operand.shape[-1]
  onehot = (indices[..., 0][..., None] == jnp.arange(c, dtype=indices.dtype))  # [B.., G, C]
  return operand + jnp.sum(onehot.astype(operand.dtype) * updates[..., None], axis=-2)


def _slice_max_pool(eqn, x):
  """NHWC reduce_window_max (window (1, kh, kw, 1), no dilation) as the max of kh * kw
  strided slices of the -inf padded input (jax2onnx emits a MaxPool kernel over all four
  dims that onnxruntime rejects). Exact. -> None for other windows."""
  p = eqn.params
  win, st, pad = p["window_dimensions"], p["window_strides"], p["padding"]
  if (x.ndim != 4 or win[0] != 1 or win[3] != 1 or st[0] != 1 or st[3] != 1
      or any(d != 1 for d in p["base_dilation"] + p["window_dilation"])
      or tuple(pad[0]) != (0, 0) or tuple(pad[3]) != (0, 0)):
    return None
  lo = jnp.array(-jnp.inf, x.dtype)
  xp = jax.lax.pad(x, lo, [(0, 0, 0), (pad[1][0], pad[1][1], 0), (pad[2][0], pad[2][1], 0),
                           (0, 0, 0)])
  ho = (xp.shape[1] - win[1]) // st[1] + 1
  wo = (xp.shape[2] - win[2]) // st[2] + 1
  out = None
  for i in range(win[1]):
    for j in range(win[2]):
      sl = jax.lax.slice(xp, (0, i, j, 0),
                         (xp.shape[0], i + st[1] * (ho - 1) + 1, j + st[2] * (wo - 1) + 1,
                          xp.shape[3]), (1, st[1], st[2], 1))
      out = sl if out is None else jnp.maximum(out, sl)
  return out


def _sub_closed(closed, rewrite):
  """ClosedJaxpr -> ClosedJaxpr with `rewrite` applied to its equations."""
  avals = [v.aval for v in closed.jaxpr.invars]
  return jax.make_jaxpr(lambda *a: rewrite(closed, *a))(
      *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals])


def eval_rewritten(closed, *args):
  """Evaluates a ClosedJaxpr with the ONNX-friendly rewrites; returns the outputs list."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jcore.Literal) else env[v]

  for v, c in zip(closed.jaxpr.constvars, closed.consts):
    env[v] = c
  for v, a in zip(closed.jaxpr.invars, args):
    env[v] = a
  for eqn in closed.jaxpr.eqns:
    ins = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    p = eqn.params
    outs = None
    if name in ("pjit", "jit"):
      outs = eval_rewritten(p["jaxpr"], *ins)
    elif name == "custom_jvp_call":
      outs = eval_rewritten(p["call_jaxpr"], *ins)
    elif name == "custom_vjp_call":
      outs = eval_rewritten(p["call_jaxpr"], *ins)
    elif name == "while":
      params = dict(p, cond_jaxpr=_sub_closed(p["cond_jaxpr"], eval_rewritten),
                    body_jaxpr=_sub_closed(p["body_jaxpr"], eval_rewritten))
      outs = eqn.primitive.bind(*ins, **params)
    elif name == "cond":
      params = dict(p, branches=tuple(_sub_closed(b, eval_rewritten) for b in p["branches"]))
      outs = eqn.primitive.bind(*ins, **params)
    elif name == "reduce_window_max":
      outs = _slice_max_pool(eqn, ins[0])
    elif name == "scatter-add":
      outs = _scatter_add_onehot(eqn, *ins)
    elif name == "gather" and _is_bool(ins[0]):
      outs = eqn.primitive.bind(ins[0].astype(jnp.uint8), *ins[1:], **dict(
          p, fill_value=None if p.get("fill_value") is None else int(p["fill_value"])))
      outs = outs.astype(jnp.bool_)
    elif name == "select_n" and _is_bool(ins[1]):
      outs = eqn.primitive.bind(ins[0], *[x.astype(jnp.uint8) for x in ins[1:]], **p)
      outs = outs.astype(jnp.bool_)
    elif name == "scatter" and _is_bool(ins[0]):
      outs = eqn.primitive.bind(ins[0].astype(jnp.uint8), ins[1], ins[2].astype(jnp.uint8),
                                **p).astype(jnp.bool_)
    if outs is None:
      outs = eqn.primitive.bind(*ins, **p)
    if not eqn.primitive.multiple_results and not isinstance(outs, (list, tuple)):
      outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in closed.jaxpr.outvars]


def compact_initializers(path: str, min_elems: int = 1 << 16) -> Tuple[int, int]:
  """Rewrites `path` smaller, same values: large uniform initializers (broadcast zeros /
  ones the converter folded into the graph) become ConstantOfShape nodes, and repeated
  initializers (the converter stores a weight once per use) one shared tensor.
  -> (number replaced by ConstantOfShape, number of duplicates dropped)."""
  import hashlib
  import onnx
  from onnx import helper, numpy_helper
  m = onnx.load(path)
  n_fill = n_dup = 0

  def visit(graph, outer_alias):
    nonlocal n_fill, n_dup
    keep, fills, alias, seen = [], [], dict(outer_alias), {}
    outputs = {o.name for o in graph.output}
    for init in graph.initializer:
      arr = numpy_helper.to_array(init)
      if arr.size >= min_elems:
        first = arr.reshape(-1)[:1]
        if np.array_equal(np.broadcast_to(first, arr.shape), arr):
          shape = numpy_helper.from_array(np.asarray(arr.shape, np.int64), init.name + "__shape")
          fills.append((shape, helper.make_node(
              "ConstantOfShape", [shape.name], [init.name], name=init.name + "__fill",
              value=numpy_helper.from_array(first.copy()))))
          n_fill += 1
          continue
      key = (arr.dtype.str, arr.shape, hashlib.sha1(arr.tobytes()).hexdigest())
      if (key in seen and init.name not in outputs
          and np.array_equal(numpy_helper.to_array(seen[key]), arr)):
        alias[init.name] = seen[key].name
        n_dup += 1
        continue
      seen[key] = init
      keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep + [sh for sh, _ in fills])
    nodes = [nd for _, nd in fills] + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    for node in graph.node:
      for i, name in enumerate(node.input):
        if name in alias:
          node.input[i] = alias[name]
      for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
          visit(a.g, alias)
        for g in a.graphs:
          visit(g, alias)

  visit(m.graph, {})
  onnx.save(m, path)
  return n_fill, n_dup


def restore_output_shapes(path: str, shapes) -> int:
  """Gives each graph output of `path` its JAX shape back -> number of outputs fixed.

  jax2onnx 0.17.1 folds reshape -> elementwise -> reshape chains even when the elementwise
  value is also a graph output, which then keeps the inner shape (mask_probs [K, 28, 28]
  instead of [N, K, 28, 28]: the sigmoid between the mask head's [N*K] rows and the MaskIoU
  head's). Values are unchanged, so the output becomes a Reshape of the folded value.
  shapes: one tuple per graph output, in order."""
  import onnx
  from onnx import helper, numpy_helper
  m = onnx.load(path)
  g = m.graph
  fixed = 0
  for out, shape in zip(g.output, shapes):
    dims = [d.dim_value for d in out.type.tensor_type.shape.dim]
    if dims == list(shape):
      continue
    if int(np.prod(dims)) != int(np.prod(shape)):
      raise RuntimeError(f"ONNX output {out.name} has shape {dims}, the JAX output {shape}")
    inner = out.name + "__folded"
    for node in g.node:
      node.output[:] = [inner if o == out.name else o for o in node.output]
      node.input[:] = [inner if i == out.name else i for i in node.input]
    for info in g.value_info:
      if info.name == out.name:
        info.name = inner
    const = numpy_helper.from_array(np.asarray(shape, np.int64), out.name + "__shape")
    g.initializer.append(const)
    g.node.append(helper.make_node("Reshape", [inner, const.name], [out.name],
                                   name=out.name + "__reshape"))
    del out.type.tensor_type.shape.dim[:]
    for d in shape:
      out.type.tensor_type.shape.dim.add().dim_value = int(d)
    fixed += 1
  if fixed:
    onnx.save(m, path)
  return fixed


def export_onnx(fn, specs, path: str, input_names, output_names, fast: bool = True):
  """Writes fn(*specs) -> tuple of arrays (the inference with the weights closed over;
  `export.inference_fn`) as one self-contained ONNX file -> info dict for the JSON.
  fast=False: jax2onnx's own (quadratic) output check (`_fast_output_check`)."""
  version = importlib.metadata.version("jax2onnx")
  if version != JAX2ONNX_VERSION:
    print(f"warning: jax2onnx {version} installed, this export is tested with "
          f"{JAX2ONNX_VERSION}", file=sys.stderr)
  with kernels.depthwise_impl("lax"):  # one ONNX grouped Conv, not k*k Mul + Add nodes
    closed = jax.make_jaxpr(fn)(*specs)
  flat = jax.make_jaxpr(lambda *a: eval_rewritten(closed, *a))(*specs)

  def flat_fn(*args):
    return tuple(jax.core.eval_jaxpr(flat.jaxpr, flat.consts, *args))

  if os.path.exists(path + ".data"):
    os.remove(path + ".data")
  with _quiet_jax2onnx(), (_fast_output_check() if fast else contextlib.nullcontext()):
    jax2onnx.to_onnx(flat_fn, list(specs),
                     model_name=os.path.splitext(os.path.basename(path))[0],
                     return_mode="file", output_path=path, export_mode="web", opset=OPSET,
                     input_names=list(input_names), output_names=list(output_names))
  n_reshaped = restore_output_shapes(
      path, [tuple(o.shape) for o in jax.tree_util.tree_leaves(jax.eval_shape(fn, *specs))])
  n_fill, n_dup = compact_initializers(path)
  return {"file": os.path.basename(path), "bytes": os.path.getsize(path), "opset": OPSET,
          "jax2onnx_version": version, "runtime": "onnxruntime (CPUExecutionProvider)",
          "initializers_as_constant_of_shape": n_fill, "duplicate_initializers_merged": n_dup,
          "outputs_reshaped_back": n_reshaped}
