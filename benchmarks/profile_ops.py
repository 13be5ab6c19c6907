"""Top XLA ops by time for inference (`predict`) or the training step, from jax.profiler.

  python benchmarks/profile_ops.py --model mv2 [--what predict|train] [--batch 2] [--iters 3]
      [--top 30] [--by op|source|kind|census] [--canvas HxW]

Same models, weights, images and padded shapes as `vs_reference.py` (b1 = img1, b2 = both
images). The jitted function runs `--iters` times under `jax.profiler`; every executed
thunk (an HLO fusion, convolution, dot, custom call, ...) is summed by name over the runs
and mapped to its HLO instruction in the compiled module: opcode, output shape and the
JAX source op (`metadata op_name`). `--by source` groups by that op_name path with the
numbers stripped (e.g. all depthwise convs of one module kind) instead of per instruction.
Times are per call (sum / iters); "%" is of the summed op time, not wall time.
`--by census` instead re-times every distinct convolution and dot instruction of the
compiled program alone (fresh inputs of its shapes, its window / dimension numbers, min of
--iters calls) and prints its count, time and GFLOP/s: the ops that run far below the
machine's rate, free of the profiler's asynchronous-thunk upper bounds.
"""
import argparse
import bisect
import collections
import glob
import os
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def hlo_index(hlo_text):
  """name -> (opcode, shape, op_name) for every instruction of the compiled HLO text."""
  idx = {}
  pat = re.compile(r"^\s*(?:ROOT\s+)?(%?[\w.\-]+)\s*=\s*(\S+(?:\[[^\]]*\])?(?:\{[^}]*\})?)\s+"
                   r"([\w\-]+)\(")
  for line in hlo_text.splitlines():
    m = pat.match(line)
    if not m:
      continue
    name, shape, opcode = m.group(1).lstrip("%"), m.group(2), m.group(3)
    src = re.search(r'op_name="([^"]*)"', line)
    kind = re.search(r'kind=(k\w+)', line)
    calls = re.search(r'calls=(%?[\w.\-]+)', line)
    idx[name] = (opcode + (f":{kind.group(1)}" if kind else ""), shape,
                 src.group(1) if src else "", calls.group(1).lstrip("%") if calls else None)
  return idx


def fused_source(idx, hlo_text, comp):
  """The op_names inside a fused computation (to describe what a fusion does)."""
  out = []
  m = re.search(r"^%?" + re.escape(comp) + r"\b.*?\{\n(.*?)\n\}", hlo_text, re.S | re.M)
  if not m:
    return ""
  for line in m.group(1).splitlines():
    op = re.search(r"=\s*\S+\s+([\w\-]+)\(", line)
    if op and op.group(1) in ("convolution", "dot", "reduce", "reduce-window", "gather",
                               "scatter", "select-and-scatter", "sort", "custom-call"):
      src = re.search(r'op_name="([^"]*)"', line)
      out.append(op.group(1) + ("@" + src.group(1).split("/")[-1] if src else ""))
  return ",".join(sorted(set(out)))[:120]


def self_times(prof, idx, iters):
  """-> ({thunk name: self seconds per call}, wall seconds per call) from an XSpace.

  Thunks nest (a while/conditional/call thunk contains the thunks of its body, on the same
  thread), so each event's time is its duration minus that of the thunk events it contains
  on its thread; events that are not HLO instructions (profiler bookkeeping) are ignored.
  A thunk that runs asynchronously (XLA:CPU's own convolutions: its event ends when the
  work is handed to the thread pool) lasts until its "end: NAME" marker (the first one
  after its event, on any thread) and counts whole, as a leaf: thunks that run beside it
  are not subtracted. That is an upper bound: the marker can be recorded long after the
  work ended (a 5 ms stem conv showed 100 ms to its marker while its consumer started 19 ms
  after the dispatch); whole-program timings decide.
  """
  ends = collections.defaultdict(list)
  for plane in prof.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for e in line.events:
        if e.name.startswith("end: ") and e.name[5:] in idx:
          ends[e.name[5:]].append(e.start_ns)
  for v in ends.values():
    v.sort()
  tot = collections.Counter()
  t0, t1 = None, None
  for plane in prof.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if line.name == "python":
        continue
      evs = []
      for e in line.events:
        if e.name not in idx:
          continue
        s, end = e.start_ns, e.start_ns + e.duration_ns
        marks, done = ends.get(e.name), None
        if marks:
          i = bisect.bisect_left(marks, s)
          if i < len(marks) and marks[i] > end:
            done = marks[i]
        evs.append((s, end, e.name, done))
      evs.sort(key=lambda e: (e[0], -e[1]))
      stack = []  # [child time, name, start, end]
      def close(item):
        tot[item[1]] += (item[3] - item[2] - item[0]) / 1e9 / iters
      for s, e, name, done in evs:
        while stack and stack[-1][3] <= s:
          close(stack.pop())
        if stack:
          stack[-1][0] += e - s
        if done is None:
          stack.append([0, name, s, e])
        else:  # asynchronous: a leaf, whatever runs beside it
          tot[name] += (done - s) / 1e9 / iters
          e = done
        t0 = s if t0 is None else min(t0, s)
        t1 = e if t1 is None else max(t1, e)
      while stack:
        close(stack.pop())
  return tot, ((t1 - t0) / 1e9 / iters if t0 is not None else 0.0)


def _census_ops(text):
  """-> Counter of (kind, lhs shape, rhs shape, out shape, attributes) over the compiled
  HLO's convolution and dot instructions, and {key: JAX op_name} of one instance each."""
  shapes = {}
  for name, (_, shape, _, _) in hlo_index(text).items():
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    if m:
      shapes[name] = tuple(int(v) for v in m.group(1).split(",") if v)
  pat = re.compile(r"= \w+\[([\d,]*)\]\S* (convolution|dot)\(%?([\w.\-]+), %?([\w.\-]+)\), (.*)$")
  ops, names = collections.Counter(), {}
  for line in text.splitlines():
    m = pat.search(line)
    if not m:
      continue
    rest = m.group(5)
    if m.group(2) == "convolution":
      attrs = tuple(re.search(k + r"=(\{[^}]*\}|[^,\s]+)", rest) for k in
                    ("window", "dim_labels", "feature_group_count", "batch_group_count"))
    else:
      attrs = tuple(re.search(k + r"=(\{[^}]*\})", rest) for k in
                    ("lhs_contracting_dims", "rhs_contracting_dims", "lhs_batch_dims",
                     "rhs_batch_dims"))
    key = (m.group(2), shapes[m.group(3)], shapes[m.group(4)],
           tuple(int(v) for v in m.group(1).split(",") if v),
           tuple(a.group(1) if a else "" for a in attrs))
    ops[key] += 1
    src = re.search(r'op_name="([^"]*)"', rest)
    names.setdefault(key, src.group(1) if src else "")
  return ops, names


def _census_fn(key):
  """The jitted lax op of a census key and its FLOPs (2 x multiply-adds)."""
  import jax
  import numpy as np
  kind, ls, rs, out, attrs = key
  ints = lambda t: tuple(int(v) for v in re.findall(r"\d+", t))
  if kind == "dot":
    lc, rc, lb, rb = (ints(a) for a in attrs)
    fn = jax.jit(lambda a, b: jax.lax.dot_general(a, b, ((lc, rc), (lb, rb))))
    return fn, 2 * int(np.prod(out)) * int(np.prod([ls[i] for i in lc]))
  window, labels, fgc, bgc = attrs
  nd = len(ls) - 2
  win = dict(size=[1] * nd, stride=[1] * nd, pad=[(0, 0)] * nd, lhs_dilate=[1] * nd,
             rhs_dilate=[1] * nd)
  for tok in window.strip("{}").split():
    k, v = tok.split("=")
    win[k] = ([tuple(int(t) for t in p.split("_")) for p in v.split("x")] if k == "pad"
              else [int(t) for t in v.split("x")])
  lhs, rest = labels.split("_", 1)
  rhs, res = rest.split("->")
  to_lhs = lambda l: l.replace("b", "N").replace("f", "C").replace("0", "H").replace("1", "W")
  dn = (to_lhs(lhs), rhs.replace("o", "O").replace("i", "I").replace("0", "H").replace("1", "W"),
        to_lhs(res))
  fg, bg = int(fgc or 1), int(bgc or 1)
  fn = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
      a, b, win["stride"], win["pad"], win["lhs_dilate"], win["rhs_dilate"], dn, fg, bg))
  # per output: the window's taps times the input features each output sums over
  per_out = int(np.prod(win["size"])) * (ls[lhs.index("b")] // bg if bg > 1
                                         else ls[lhs.index("f")] // fg)
  return fn, 2 * int(np.prod(out)) * per_out


def census(text, iters, top):
  """Print every distinct convolution / dot of the compiled HLO re-timed alone."""
  import time
  import jax
  import jax.numpy as jnp
  ops, names = _census_ops(text)
  rows = []
  for key, count in ops.items():
    fn, flops = _census_fn(key)
    a, b = jnp.ones(key[1], jnp.float32), jnp.ones(key[2], jnp.float32)
    jax.block_until_ready(fn(a, b))
    best = float("inf")
    for _ in range(max(iters, 1)):
      t = time.perf_counter()
      jax.block_until_ready(fn(a, b))
      best = min(best, time.perf_counter() - t)
    rows.append((best * count, best, flops / best / 1e9, count, key, names[key]))
  rows.sort(key=lambda r: -r[0])
  for kind in ("convolution", "dot"):
    sel = [r for r in rows if r[4][0] == kind]
    print(f"{kind}: {sum(r[3] for r in sel)} instructions ({len(sel)} distinct), "
          f"{sum(r[0] for r in sel):.3f} s alone per call")
  print("  total ms  count   each ms  GFLOP/s  op  lhs  rhs  out  attributes  JAX op")
  for total, each, rate, count, key, name in rows[:top]:
    kind, ls, rs, out, attrs = key
    print(f"{1e3 * total:10.2f} {count:6d} {1e3 * each:9.2f} {rate:8.1f}  {kind[:4]} "
          f"{list(ls)} {list(rs)} {list(out)} {' '.join(a for a in attrs if a)}  "
          f"{name[-70:]}")


def op_kind(idx, text, name):
  """Coarse class of a thunk: conv forward / input-grad / kernel-grad (by shapes), dot,
  transpose/copy fusions, other loop fusions, ... (for --by kind)."""
  opcode, shape, src, calls = idx[name]
  what = fused_source(idx, text, calls) if calls else ""
  if "convolution" in what or opcode.startswith("convolution"):
    dims = re.findall(r"\[([\d,]*)\]", shape)
    d = [int(v) for v in dims[0].split(",") if v] if dims else []
    if len(d) == 4 and d[1] == d[2] and d[1] in (1, 3, 5, 7) and "transpose" not in src:
      return "conv kernel-grad (output [Cout?, k, k, Cin?])"
    return "conv (forward or input-grad)" + (" [transpose(jvp)]" if "transpose(" in src else "")
  if "dot" in what or opcode.startswith("dot"):
    return "dot" + (" [transpose(jvp)]" if "transpose(" in src else "")
  if "transpose" in name or "copy" in name:
    return "transpose/copy fusion"
  return opcode.split(":")[0] + ":" + (opcode.split(":")[1] if ":" in opcode else "")


def main():
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--model", default="mv2")
  ap.add_argument("--what", default="predict", choices=("predict", "train"))
  ap.add_argument("--batch", type=int, default=2, choices=(1, 2))
  ap.add_argument("--iters", type=int, default=3)
  ap.add_argument("--top", type=int, default=30)
  ap.add_argument("--by", default="op", choices=("op", "source", "kind", "census"))
  ap.add_argument("--fg-slots", type=int, default=None,
                  help="train: foreground slots per image of the mask branch (default all; "
                       "the trainer picks the bucket holding the real count, e.g. 32 for "
                       "the reference's two images)")
  ap.add_argument("--depthwise", choices=("lax", "shifted"),
                  help="force this depthwise conv implementation (ops/kernels.py)")
  ap.add_argument("--canvas", help="HxW (multiples of the size divisibility): crop the "
                  "padded canvas and the images to it, to profile a big model in less "
                  "memory (GT boxes are kept as they are: a timing aid, not a real batch)")
  ap.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared"))
  ap.add_argument("--cache", default=os.path.join(os.path.dirname(REPO), "cache"))
  ap.add_argument("--from", dest="from_dir",
                  help="re-read a kept trace + HLO (same --iters) instead of running")
  args = ap.parse_args()
  if args.from_dir:
    return report(args, args.from_dir, "(kept)")
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.profiler import ProfileData
  import vs_reference as vr
  from centermask_jax.checkpoints import official
  from centermask_jax.config import load_config
  from centermask_jax.models.centermask import CenterMask

  from centermask_jax.ops import kernels
  if args.depthwise:
    kernels.DEPTHWISE_IMPL[jax.default_backend()] = args.depthwise
  name = vr.MODELS[args.model][0]
  cfg = load_config(os.path.join(REPO, "configs", name + ".py"))
  model = CenterMask(cfg)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
  variables = official.import_checkpoint(template, vr.weights_path(args.model, args.shared,
                                                                   args.cache))
  imgs = vr.load_images(cfg, args.shared)
  sel = [1] if args.batch == 1 else [0, 1]
  div = cfg.input.size_divisibility
  padded = tuple(max(-(-imgs[i][1][a] // div) * div for i in sel) for a in range(2))
  if args.canvas:
    padded = tuple(int(v) for v in args.canvas.lower().split("x"))
    if len(padded) != 2 or any(v <= 0 or v % div for v in padded):
      sys.exit(f"error: --canvas {args.canvas!r}: want HxW, multiples of {div}")
    imgs = [(im[0][:padded[0], :padded[1]], tuple(min(v, p) for v, p in zip(im[1], padded)),
             im[2])
            for im in imgs]
  x = np.zeros((len(sel), *padded, 3), np.uint8)  # normalised on the device
  for j, i in enumerate(sel):
    h, w = imgs[i][1]
    x[j, :h, :w] = imgs[i][0]
  image_hw = jnp.asarray([imgs[i][1] for i in sel], jnp.int32)
  padded_hw = jnp.asarray([padded] * len(sel), jnp.int32)
  if args.what == "predict":
    fn = jax.jit(model.predict)
    fargs = (jax.device_put(variables), jnp.asarray(x), image_hw, padded_hw)
  else:
    import functools
    from centermask_jax.training import optimizer as opt_lib, step as step_lib
    gt = vr.load_gt(args.shared, [im[1] for im in imgs])
    batch = {k: jnp.asarray(np.asarray(gt[k])[sel]) for k in ("gt_boxes", "gt_classes", "gt_valid",
                                              "gt_polys", "gt_poly_len")}
    batch.update(image=jnp.asarray(x), image_hw=image_hw, padded_hw=padded_hw)
    tx = opt_lib.make_optimizer(cfg, variables["params"])
    state = step_lib.init_state(variables["params"], variables["frozen_bn"], tx)
    fn = jax.jit(functools.partial(step_lib.train_step, model=model, config=cfg, tx=tx,
                                   lr_fn=opt_lib.lr_schedule(cfg), axis_name=None,
                                   fg_slots=args.fg_slots))
    fargs = (state, batch, jax.random.PRNGKey(0))
  compiled = fn.lower(*fargs).compile()
  text = compiled.as_text()
  if args.by == "census":
    return census(text, args.iters, args.top)
  jax.block_until_ready(compiled(*fargs))
  tmp = tempfile.mkdtemp(prefix="cm_prof_")
  with open(os.path.join(tmp, "hlo.txt"), "w") as f:
    f.write(text)
  jax.profiler.start_trace(tmp)
  for _ in range(args.iters):
    jax.block_until_ready(compiled(*fargs))
  jax.profiler.stop_trace()
  print(f"trace and compiled HLO kept in {tmp} (re-read with --from {tmp})")
  report(args, tmp, padded)


def report(args, tmp, padded):
  from jax.profiler import ProfileData
  with open(os.path.join(tmp, "hlo.txt")) as f:
    text = f.read()
  if args.by == "census":
    return census(text, args.iters, args.top)
  idx = hlo_index(text)
  pb = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0]
  prof = ProfileData.from_file(pb)
  tot, wall = self_times(prof, idx, args.iters)
  total = sum(tot.values())
  print(f"{args.model} {args.what} batch {args.batch} padded {padded}: wall {wall:.3f} s per "
        f"call under the profiler; summed op self time {total:.3f} s per call over "
        f"{len(tot)} thunks (threads run thunks concurrently: the sum can exceed wall)")
  if args.by == "kind":
    groups = collections.Counter()
    for k, v in tot.items():
      groups[op_kind(idx, text, k)] += v
    for k, v in groups.most_common(args.top):
      print(f"{v:8.4f} s {100 * v / total:5.1f}%  {k}")
    return
  if args.by == "source":
    groups = collections.Counter()
    for k, v in tot.items():
      opcode, shape, src, calls = idx[k]
      key = re.sub(r"\d+", "#", src or (fused_source(idx, text, calls) if calls else "")
                   or opcode) + f" [{opcode}]"
      groups[key] += v
    for k, v in groups.most_common(args.top):
      print(f"{v:8.4f} s {100 * v / total:5.1f}%  {k}")
    return
  for k, v in tot.most_common(args.top):
    opcode, shape, src, calls = idx[k]
    what = fused_source(idx, text, calls) if calls else ""
    print(f"{v:8.4f} s {100 * v / total:5.1f}%  {k:28s} {opcode:22s} {shape[:40]:40s} "
          f"{(what or src)[-110:]}")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import host_memory, runlog
  host_memory.reexec_with_hugepage_malloc()  # huge pages for XLA's buffers (host_memory)
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
