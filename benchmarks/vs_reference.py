"""Our model on exactly the work of centermask2's CPU reference timings, side by side.

  python benchmarks/vs_reference.py [--models v19dw mv2 v39] [--modes infer_b1_img0 ...]
      [--warmup 2] [--iters N] [--train-iters N] [--train-devices N] [--no-calibrate]
      [--json OUT]
      [--config.key=value ...]

The reference (`../shared/perf/reference_timings_cpu.md`, "the reference" below) timed
centermask2 on two real COCO val2017 images (ids 241668 portrait, 5001 landscape; their
decoded pixels, Lite resize and GT are in the Lite MobileNetV2 fixture) with fp16-rounded
random weights that give 50 detections per image. This script does the same work:

* models: Lite V-19-slim-DW (`v19dw`, that fixture's weights = the reference's), Lite
  MobileNetV2 (`mv2`, seed-4321 fixture weights), V-39 (`v39`, weights of its fixture's
  `make_weights.py`, written to `../cache/centermask_V_39_eSE_FPN_ms_3x/` when absent);
* `infer_b1_img0`, `infer_b1_img1`, `infer_b2`: from the resized uint8 BGR image(s) (resize
  excluded, as in the reference): the image copied into a uint8 canvas of exactly the
  reference's padded shape (Lite 864x608, 608x800, 864x800; V-39 1120x800, 800x1088,
  1120x1088), the jitted `predict` (normalisation on the device, backbone, FPN, FCOS + NMS, RoIAlign, mask and MaskIoU heads), then
  `detector_postprocess` and the mask paste at the original resolution per image, results
  pulled to host numpy;
* `train_b2`: the real pmapped training step (`training.step`, the config's SGD) with
  both images on one padded canvas (864x800 / 1120x1088) and their real COCO GT (5 and 17
  instances; the fixture's derived class-7 box is dropped), split over `--train-devices`
  host devices (default: train.py's choice, `host_devices.configure()`, fitted to the
  batch; 2 devices = 1 image each), `train.mask_loss_norm = "global"` so that the loss is
  the reference's one-process batch-of-2 loss on any device count. For V-39 the GT polygons
  and boxes are the Lite ones scaled by the ratio of the two resizes (float32). The state is
  restored before every timed step (untimed), like the reference's weight/optimiser reset.

Each (model, mode) runs in its own subprocess: `--warmup` untimed calls, then `--iters`
(inference, default 10) or `--train-iters` (default 7) timed calls. Per row: compile s
(first call minus the median), median and min s, peak RSS the reference's way (high-water
mark reset after model and inputs are built, read after the last call: warm-up =
compilation included) and over the timed calls only, the reference row scaled to this
machine by `../shared/perf/calibrate.py` (run in this process tree before the first row and
after every row; each row uses the mean of the calibrations just before and just after it,
because the shared machine's speed drifts by up to 1.5x within minutes; at the end the x of
every row again at the median of all the run's calibrations, the steadier estimate when
calibrations seconds apart disagree), and `x` = scaled reference median / our median (> 1:
we are faster).
`cpu_s` is the median process CPU time per call (all threads): on a loaded machine it moves
less than wall time (the reference used ~1.9 of its 2 cores while measuring); `thr_s` the
median CPU time of the busiest thread (a lower bound on the wall time that the load moves
little: ~cpu_s when one thread does the work, ~cpu_s / 2 when two devices share it). The machine
may be shared: read the 1-min load average printed with each row.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # key: (config file, fixture folder name, weights folder ("fixture" | "cache"), label)
    "v19dw": ("centermask_lite_V_19_slim_dw_eSE_FPN_ms_4x", "fixture", "Lite V-19-slim-DW"),
    "mv2": ("centermask_lite_Mv2_FPN_ms_4x", "fixture", "Lite MobileNetV2"),
    "v39": ("centermask_V_39_eSE_FPN_ms_3x", "cache", "V-39"),
}
MODES = ("infer_b1_img0", "infer_b1_img1", "infer_b2", "train_b2")
IMAGES_FIXTURE = "centermask_lite_Mv2_FPN_ms_4x"  # holds the reference's two images and GT
# reference_timings_cpu.md §1: (median s, min s, peak RSS GiB, padded H x W)
REFERENCE = {
    ("v19dw", "infer_b1_img0"): (0.539, 0.482, 0.59, (864, 608)),
    ("v19dw", "infer_b1_img1"): (0.442, 0.396, 0.58, (608, 800)),
    ("v19dw", "infer_b2"): (1.395, 1.284, 0.86, (864, 800)),
    ("v19dw", "train_b2"): (3.111, 2.873, 2.29, (864, 800)),
    ("mv2", "infer_b1_img0"): (0.503, 0.456, 0.57, (864, 608)),
    ("mv2", "infer_b1_img1"): (0.476, 0.438, 0.57, (608, 800)),
    ("mv2", "infer_b2"): (1.432, 1.361, 0.85, (864, 800)),
    ("mv2", "train_b2"): (3.282, 3.006, 2.90, (864, 800)),
    ("v39", "infer_b1_img0"): (3.645, 3.401, 1.39, (1120, 800)),
    ("v39", "infer_b1_img1"): (3.578, 3.296, 1.33, (800, 1088)),
    ("v39", "infer_b2"): (10.676, 10.040, 2.20, (1120, 1088)),
    ("v39", "train_b2"): (30.725, 28.920, 5.81, (1120, 1088)),
}


# ----------------------------------------------------------------------------- child side
def _reset_hwm():
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
  except OSError:
    pass


def _hwm_gib():
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def _thread_cpu():
  """{thread id: user + system CPU s} of this process's threads (Linux /proc; {} elsewhere)."""
  out, tick = {}, os.sysconf("SC_CLK_TCK")
  try:
    tids = os.listdir("/proc/self/task")
  except OSError:
    return out
  for tid in tids:
    try:
      with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
      out[tid] = (int(fields[11]) + int(fields[12])) / tick
    except (OSError, IndexError, ValueError):
      pass
  return out


def weights_path(key, shared, cache):
  name, where, _ = MODELS[key]
  if where == "fixture":
    return os.path.join(shared, "fixtures", name, "model_random_fp16.pth")
  path = os.path.join(cache, name, "model_random_fp16.pth")
  if not os.path.exists(path):  # the fixture's recipe, written bit-exactly (its README)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fx = os.path.join(shared, "fixtures", name)
    subprocess.run([sys.executable, os.path.join(fx, "make_weights.py"),
                    os.path.join(shared, "fixtures", "state_dict_keys", name + ".tsv"), "1234",
                    "model_random_fp16.pth"], cwd=os.path.dirname(path), check=True)
  return path


def load_images(cfg, shared):
  """-> list of (resized uint8 BGR [h, w, 3], (h, w), (H0, W0)) for img0, img1 at the
  config's test size (PIL bilinear, as detectron2's ResizeShortestEdge)."""
  import numpy as np
  from centermask_jax.data import transforms
  inp = np.load(os.path.join(shared, "fixtures", IMAGES_FIXTURE, "inputs.npz"))
  out = []
  for i in range(2):
    orig = inp[f"img{i}_orig_rgb_uint8"]
    bgr = np.ascontiguousarray(orig[:, :, ::-1])
    hw = transforms.get_output_shape(*orig.shape[:2], cfg.input.min_size_test,
                                     cfg.input.max_size_test)
    stored = inp[f"img{i}_resized_bgr_uint8"]
    img = stored if tuple(stored.shape[:2]) == tuple(hw) else transforms.resize_uint8(bgr, hw)
    out.append((img, tuple(hw), tuple(orig.shape[:2])))
  return out


def mode_batch(cfg, imgs, mode):
  """-> (indices of `imgs` in the mode's batch, its official padded (H, W))."""
  from centermask_jax.ops import padding
  sel = {"infer_b1_img0": [0], "infer_b1_img1": [1]}.get(mode, [0, 1])
  div = cfg.input.size_divisibility
  padded = tuple(max(int(padding.official_padded_hw(imgs[i][1][a], div)) for i in sel)
                 for a in range(2))
  return sel, padded


def load_gt(shared, hws):
  """Real COCO GT of both images (derived box dropped), scaled from the fixture's Lite
  resize to `hws` -> batch-contract arrays [2, G, ...]."""
  import numpy as np
  from centermask_jax.tools.parity_train import load_fixture_gt
  fx = os.path.join(shared, "fixtures", IMAGES_FIXTURE)
  lite_hw = [tuple(int(v) for v in s)
             for s in np.load(os.path.join(fx, "inputs.npz"))["image_sizes"]]
  gt = load_fixture_gt(fx)
  with open(os.path.join(fx, "gt_instances.json")) as f:
    gj = json.load(f)
  for i in range(2):
    ids = gj[f"img{i}"]["coco_ann_ids"]
    for k, a in enumerate(ids):
      if a is None:
        gt["gt_valid"][i, k] = False
    sy = np.float32(hws[i][0] / lite_hw[i][0])
    sx = np.float32(hws[i][1] / lite_hw[i][1])
    gt["gt_boxes"][i] *= np.array([sx, sy, sx, sy], np.float32)
    gt["gt_polys"][i] *= np.array([sx, sy], np.float32)
  return gt


def run_child(key, mode, warmup, iters, shared, cache, config_argv, train_devices=1):
  import jax
  import jax.numpy as jnp
  import numpy as np

  from centermask_jax.checkpoints import official
  from centermask_jax.config import config_or_exit
  from centermask_jax.models.centermask import CenterMask

  name, _, label = MODELS[key]
  cfg = config_or_exit(os.path.join(REPO, "configs", name + ".py"), config_argv)
  model = CenterMask(cfg)
  template = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0)))
  template = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), template)
  variables = official.import_checkpoint(template, weights_path(key, shared, cache))
  imgs = load_images(cfg, shared)
  sel, padded = mode_batch(cfg, imgs, mode)
  assert padded == REFERENCE[(key, mode)][3], (padded, REFERENCE[(key, mode)][3])
  n = len(sel)
  image_hw = np.asarray([imgs[i][1] for i in sel], np.int32)
  padded_hw = np.asarray([padded] * n, np.int32)
  info = {}

  if mode.startswith("infer"):
    from centermask_jax.predictor import image_instances
    variables = jax.device_put(variables)
    from centermask_jax import host_memory
    predict = jax.jit(model.predict)
    thr = cfg.model.mask_head.mask_threshold
    compiled = set()

    def call():
      x = np.zeros((n, *padded, 3), np.uint8)  # uint8 canvas; normalised on the device
      for j, i in enumerate(sel):
        h, w = imgs[i][1]
        x[j, :h, :w] = imgs[i][0]
      out = predict(variables, jnp.asarray(x), jnp.asarray(image_hw), jnp.asarray(padded_hw))
      res = []
      for j, i in enumerate(sel):
        res.append(image_instances(out["boxes"][j], out["scores"][j], out["classes"][j],
                                   out["mask_probs"][j], out["mask_scores"][j],
                                   out["valid"][j], imgs[i][1], imgs[i][2], thr))
      host_memory.release_after_compile(compiled, "predict")  # as the Predictor does
      return res
    _reset_hwm()
    res = None
  else:
    from centermask_jax import parallel
    from centermask_jax.training import optimizer as opt_lib, step as step_lib
    hws = [im[1] for im in imgs]
    gt = load_gt(shared, hws)
    x = np.zeros((2, *padded, 3), np.uint8)  # as the data pipeline sends it
    for i in range(2):
      h, w = hws[i]
      x[i, :h, :w] = imgs[i][0]
    batch = {k: gt[k] for k in ("gt_boxes", "gt_classes", "gt_valid", "gt_polys",
                                "gt_poly_len")}
    batch.update(image=x, image_hw=image_hw, padded_hw=padded_hw)
    info["gt"] = [int(v) for v in gt["gt_valid"].sum(1)]
    # Means over the whole batch, as the reference's one process (identical on 1 device;
    # on 2 the default per-device mask-loss means would be 2-GPU DDP's numbers instead).
    cfg.train.mask_loss_norm = "global"
    devices = jax.local_devices()[:train_devices]
    if len(devices) != train_devices or 2 % train_devices:
      raise SystemExit(f"error: --train-devices {train_devices}: batch 2 over "
                       f"{len(jax.local_devices())} local device(s)")
    batch = parallel.shard_batch(batch, train_devices)  # [D, 2 / D, ...], same canvas
    info["devices"] = train_devices
    tx = opt_lib.make_optimizer(cfg, variables["params"])
    host_state = step_lib.init_state(variables["params"], variables["frozen_bn"], tx)
    host_state = jax.device_get(host_state)
    key_ = jax.random.PRNGKey(0)
    fresh = lambda: parallel.replicate(host_state, devices)  # noqa: E731
    state = [fresh()]
    # The trainer's foreground slot buckets (train.fg_slot_buckets): its first step runs on
    # the bucket holding its batch's count from the forward-only program, later ones on the
    # bucket holding the counts seen; the first call here does both (compile_s counts the
    # count program's compile and the step's), the timed calls run the trainer's steady state.
    picker = step_lib.fg_slot_picker(cfg)
    exe = {}

    def first_count():
      counter = step_lib.make_fg_count(model, cfg, devices)
      return int(np.max(jax.device_get(counter(state[0], batch, key_))))

    def call():
      k = picker.pick(first_count) if picker else None
      while True:
        if k not in exe:  # compiled ahead of the first run, as the trainer does
          if not exe:  # the count program ran once: dropped, as the trainer does
            parallel.drop_compiled_programs()
          p_step = step_lib.make_train_step(model, cfg, tx, opt_lib.lr_schedule(cfg),
                                            devices=devices,
                                            fg_slots=picker.step_slots(k) if picker else k)
          exe[k] = parallel.compile_ahead(p_step, state[0], batch, key_)
        st, m = exe[k](state[0], batch, key_)
        if picker is None:
          break
        again = picker.observe(k, int(np.max(jax.device_get(m["fg_max"]))))
        if again is None and picker.pick() == k:
          break
        k = picker.pick() if again is None else again
        state[0] = fresh()
      info["fg_slots"] = k
      return jax.block_until_ready(m)
    _reset_hwm()

  threads = []  # per call: CPU s of the busiest thread

  def timed():
    if not mode.startswith("infer"):
      state[0] = fresh()  # restore weights + optimiser state (untimed)
    t0 = _thread_cpu()
    t, c = time.perf_counter(), time.process_time()
    r = call()
    t, c = time.perf_counter() - t, time.process_time() - c
    t1 = _thread_cpu()
    threads.append(max([t1[k] - t0.get(k, 0.0) for k in t1] or [float("nan")]))
    return t, c, r

  first, _, res = timed()
  for _ in range(max(0, warmup - 1)):
    timed()
  hwm_warm = _hwm_gib()
  _reset_hwm()
  times, cpus = [], []
  del threads[:]
  for _ in range(iters):
    t, c, res = timed()
    times.append(t)
    cpus.append(c)
  med = statistics.median(times)
  if mode.startswith("infer"):
    info["dets"] = [int(len(r["scores"])) for r in res]
  else:
    info["loss"] = float(res["total_loss"][0])
    info["num_fg"] = float(res["num_fg"][0])
  hwm_run = _hwm_gib()
  return dict(model=key, label=label, mode=mode, padded=f"{padded[0]}x{padded[1]}",
              backend=jax.default_backend(), compile_s=round(first - med, 2),
              median_s=round(med, 4), min_s=round(min(times), 4), n=len(times),
              times=[round(t, 4) for t in times], cpu_s=round(statistics.median(cpus), 4),
              thread_cpu_s=round(statistics.median(threads), 4),
              peak_gib=round(max(hwm_warm, hwm_run), 3), run_gib=round(hwm_run, 3),
              loadavg=[round(v, 2) for v in os.getloadavg()], **info)


# ----------------------------------------------------------------------------- parent side
def calibrate(shared):
  out = subprocess.run([sys.executable, os.path.join(shared, "perf", "calibrate.py")],
                       capture_output=True, text=True)
  if out.returncode:
    print(f"calibration failed (needs torch): {out.stderr.strip()[-500:]}", flush=True)
    return None
  r = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"calibration: {json.dumps(r)}", flush=True)
  return r


def _ref(row, i):
  """Reference median (i = 0) or min (i = 1) seconds of a row's (model, mode)."""
  return REFERENCE[(row["model"], row["mode"])][i]


def row_scale(around):
  """The calibrations [before, after] a row (None = failed) -> the row's scale: their mean
  (1.0, the unscaled reference, when none succeeded)."""
  scales = [c["scale"] for c in around if c]
  return statistics.mean(scales) if scales else 1.0


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
  ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--iters", type=int, default=10, help="timed inference calls")
  ap.add_argument("--train-iters", type=int, default=7, help="timed training steps")
  ap.add_argument("--train-devices", type=int, default=None,
                  help="train_b2 on N host devices, batch 2 split over them (1 or 2; "
                       "default: host_devices.configure()'s choice, as train.py)")
  ap.add_argument("--no-calibrate", action="store_true",
                  help="compare with the unscaled reference (scale 1)")
  ap.add_argument("--shared", default=os.path.join(os.path.dirname(REPO), "shared"))
  ap.add_argument("--cache", default=os.path.join(os.path.dirname(REPO), "cache"))
  ap.add_argument("--json", help="write every row (with all times) to this file")
  ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
  args, extra = ap.parse_known_args(argv)
  sys.path.insert(0, REPO)
  from centermask_jax.config import config_or_exit  # --config.KEY=VALUE as every CLI
  for key in args.models:  # a bad override fails here, before any run
    config_or_exit(os.path.join(REPO, "configs", MODELS[key][0] + ".py"), extra)
  if args._child:
    key, mode = args._child
    from centermask_jax import host_devices  # before JAX starts, as the entry points
    n = host_devices.configure(args.train_devices if mode == "train_b2" else None,
                               auto=host_devices.ENTRY_POINT_AUTO)
    args.train_devices = host_devices.device_count_for_batch(2, n)
    iters = args.iters if mode.startswith("infer") else args.train_iters
    print(json.dumps(run_child(key, mode, args.warmup, iters, args.shared, args.cache,
                               extra, args.train_devices)))
    return

  cal = [] if args.no_calibrate else [calibrate(args.shared)]
  hdr = (f"{'model':18s} {'mode':14s} {'padded':>9s} {'compile_s':>9s} {'median_s':>8s} "
         f"{'min_s':>7s} {'peakGiB':>7s} {'runGiB':>6s} | {'scale':>5s} {'ref_med':>7s} "
         f"{'ref_min':>7s} {'refGiB':>6s} {'x_med':>5s} {'x_min':>5s} {'cpu_s':>6s} "
         f"{'thr_s':>5s}  load  notes")
  print(hdr, flush=True)
  rows = []
  for key in args.models:
    for mode in args.modes:
      cmd = [sys.executable, os.path.abspath(__file__), "--_child", key, mode,
             "--warmup", str(args.warmup), "--iters", str(args.iters), "--train-iters",
             str(args.train_iters), "--shared", args.shared, "--cache", args.cache, *extra]
      if args.train_devices:
        cmd += ["--train-devices", str(args.train_devices)]
      from centermask_jax import host_memory  # huge pages for the child's XLA buffers
      env = host_memory.child_environ(dict(
          os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")))
      out = subprocess.run(cmd, capture_output=True, text=True, env=env)
      if not args.no_calibrate:
        cal.append(calibrate(args.shared))
      if out.returncode:
        print(f"{MODELS[key][2]:18s} {mode:14s} FAILED\n{out.stderr[-3000:]}", flush=True)
        continue
      r = json.loads(out.stdout.strip().splitlines()[-1])
      r["scale"] = row_scale(cal[-2:])
      rows.append(r)
      ref_med, ref_min, ref_gib, _ = REFERENCE[(key, mode)]
      scale0 = r["scale"]
      notes = (f"dets {r['dets']}" if "dets" in r else
               f"GT {r['gt']} fg {r['num_fg']:.0f} loss {r['loss']} "
               f"devices {r['devices']} fg slots {r.get('fg_slots') or 'all'}")
      print(f"{r['label']:18s} {mode:14s} {r['padded']:>9s} {r['compile_s']:9.1f} "
            f"{r['median_s']:8.3f} {r['min_s']:7.3f} {r['peak_gib']:7.2f} {r['run_gib']:6.2f} | "
            f"{scale0:5.3f} {ref_med * scale0:7.3f} {ref_min * scale0:7.3f} {ref_gib:6.2f} "
            f"{ref_med * scale0 / r['median_s']:5.2f} {ref_min * scale0 / r['min_s']:5.2f} "
            f"{r['cpu_s']:6.2f} {r['thread_cpu_s']:5.2f}  {r['loadavg'][0]:.1f}  {notes}",
            flush=True)
  scales = [c["scale"] for c in cal if c]
  scale = statistics.median(scales) if scales else 1.0
  if len(scales) > 1:
    # Calibrations seconds apart differ by up to 1.5x on a shared host: the run's median is
    # the steadier estimate, the per-row scale the local one; both are printed.
    print(f"calibration scale over the run: {min(scales):.3f}-{max(scales):.3f}, median "
          f"{scale:.3f} (rows above: the mean of the two around each); x_med / x_min at the "
          "median: " + ", ".join(
              f"{r['model']}/{r['mode']} {_ref(r, 0) * scale / r['median_s']:.2f} / "
              f"{_ref(r, 1) * scale / r['min_s']:.2f}" for r in rows), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"calibration": cal, "scale_median": scale, "rows": rows,
                 "reference": {f"{k}/{m}": v[:3] for (k, m), v in REFERENCE.items()}}, f,
                indent=1)


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from centermask_jax import runlog
  runlog.quiet_startup()  # before TensorFlow is imported
  main()
