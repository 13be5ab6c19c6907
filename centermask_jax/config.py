"""Base configuration (ml_collections) shared by every file in configs/.

Values are centermask2's (spec §f). Config files call `base_config()` then
`lite(...)`/`full(...)` and set the backbone. Unknown keys fail loudly because
ConfigDicts are locked after construction.
"""
import ml_collections

from centermask_jax import errors

PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
FULL_TRAIN_SIZES = (640, 672, 704, 736, 768, 800)
LITE_TRAIN_SIZES = (580, 600)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = ""
  c.weights = ""  # optional checkpoint to initialise from (official .pth/.pkl or ours)
  # persistent XLA compilation cache ("" = $CENTERMASK_JAX_CACHE_DIR or
  # ~/.cache/centermask_jax/xla, "none" = off); see centermask_jax/compilation_cache.py
  c.compilation_cache_dir = ""

  m = c.model = ml_collections.ConfigDict()
  m.num_classes = 80
  m.backbone = ml_collections.ConfigDict(dict(
      name="vovnet",            # vovnet | resnet | mobilenetv2
      variant="V-39-eSE",       # VoVNet variant (spec §a.1)
      depth=50,                 # ResNet depth
      num_groups=1,
      width_per_group=64,
      stride_in_1x1=True,
      freeze_at=0,              # 0: all trainable (norms are FrozenBN anyway)
      norm="FrozenBN",          # VoVNet only: FrozenBN (official) | GN (from-scratch training)
      stage_with_dcn=(False, False, False, False),  # VoVNet stages 2..5: modulated DCN 3x3
      dcn_impl="gather",        # ops/deform_conv impl: gather | gather_autodiff | naive
  ))
  m.fpn_channels = 256
  m.fcos = ml_collections.ConfigDict(dict(
      num_convs=4,
      strides=(8, 16, 32, 64, 128),
      sizes_of_interest=(64, 128, 256, 512),
      center_sample_radius=1.5,
      prior_prob=0.01,
      focal_alpha=0.25,
      focal_gamma=2.0,
      inference_th=0.05,
      pre_nms_topk=1000,
      nms_th=0.6,
      post_nms_topk_train=100,
      post_nms_topk_test=50,
  ))
  m.mask_head = ml_collections.ConfigDict(dict(
      num_convs=4, conv_dim=256, pooler_resolution=14, sampling_ratio=0,
      level_k_min=3, level_k_max=5, mask_threshold=0.5,
      # 28x28 / MaskIoU targets: 'device' (ops/polygon_raster, exact, in the step) or
      # 'pycocotools' (host callback, the reference).
      target_impl="device"))
  m.maskiou_head = ml_collections.ConfigDict(dict(num_convs=4, conv_dim=256, loss_weight=1.0))
  m.roi = ml_collections.ConfigDict(dict(iou_threshold=0.5, max_fg_per_image=128))

  i = c.input = ml_collections.ConfigDict()
  i.format = "BGR"
  i.pixel_mean = PIXEL_MEAN_BGR
  i.pixel_std = (1.0, 1.0, 1.0)
  i.min_size_train = FULL_TRAIN_SIZES
  i.max_size_train = 1333
  i.min_size_test = 800
  i.max_size_test = 1333
  i.random_flip = True
  i.size_divisibility = 32
  # Static canvases ((H, W) landscape, (H, W) portrait); () = derived from the sizes
  # (multiples of 128 holding every resized image). Smaller canvases = faster small-image runs.
  i.canvas_train = ()
  i.canvas_test = ()
  # 0: every batch on its group's canvas above; b > 0 (multiple of 32): each batch on its
  # largest padded image rounded up to a multiple of b (as detectron2 pads batches; one
  # compile per distinct canvas, kept by the persistent compilation cache).
  i.canvas_bucket = 0

  d = c.data = ml_collections.ConfigDict()
  d.name = "coco2017"
  d.data_dir = "~/tensorflow_datasets"
  d.max_instances = 100
  d.max_polygon_parts = 16
  d.max_polygon_vertices = 256
  d.max_instance_vertices = 512  # packed exact polygons per instance (all parts)

  o = c.optim = ml_collections.ConfigDict()
  o.optimizer = "sgd"          # sgd (official: momentum, coupled L2) | adamw (decoupled decay)
  o.ims_per_batch = 16         # reference global batch of the schedule
  o.base_lr = 0.01             # at ims_per_batch; linearly rescaled for other global batches
  o.momentum = 0.9
  o.weight_decay = 1e-4
  o.weight_decay_norm = 0.0
  o.clip_grad_norm = 0.0       # > 0: clip the global gradient's L2 norm to it (detectron2's
                               # CLIP_GRADIENTS full_model/norm); 0 = off, as centermask2
  o.warmup_iters = 1000
  o.warmup_factor = 0.001
  o.gamma = 0.1
  o.steps = (210000, 250000)
  o.max_iter = 270000

  t = c.train = ml_collections.ConfigDict()
  t.global_batch = 16
  t.seed = 0
  t.log_every = 20
  t.checkpoint_every = 5000
  t.keep_checkpoints = 3
  t.eval_every = 0              # N > 0: every N steps and at max_iter; 0: at max_iter only; -1: never
  t.bf16 = False
  # A step whose loss, gradient norm or updated state is not finite: False = stop the run
  # (naming the step and the checkpoint to resume from); True = leave params and optimiser
  # state unchanged for that step and count it (metric skipped_total).
  t.skip_nonfinite_steps = False
  # Resume with a config that differs from the saved one (model, optimiser, batch,
  # schedule, input): refused with the differences named unless True.
  t.allow_config_change = False
  # Mask / MaskIoU loss normaliser over devices: "per_device" = centermask2 under DDP (each
  # device's mean over its own foreground RoIs, gradients then averaged); "global" = sums
  # over the all-device RoI counts (gradient independent of how the batch is split).
  t.mask_loss_norm = "per_device"
  t.checkpoint_on_interrupt = True  # Ctrl-C: save the current step before stopping
  # Mask + MaskIoU branch on the smallest of 16/32/64/128 foreground slots holding the real
  # count instead of always all slots (training.step.FgSlotPicker: one program per bucket,
  # the host reads each step's foreground count). "auto": "host" on CPU, "off" (all slots,
  # no per-step host read) on accelerators. Same numbers up to GEMM rounding.
  t.fg_slot_buckets = "auto"
  return c


def lite(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """CenterMask-Lite settings: 128-ch FPN, 2-conv heads, 600/1000 sizes, 4x schedule."""
  c.model.fpn_channels = 128
  c.model.fcos.num_convs = 2
  c.model.mask_head.num_convs = 2
  c.model.mask_head.conv_dim = 128
  c.model.maskiou_head.num_convs = 2
  c.model.maskiou_head.conv_dim = 128
  c.input.min_size_train = LITE_TRAIN_SIZES
  c.input.max_size_train = 1000
  c.input.min_size_test = 600
  c.input.max_size_test = 1000
  c.optim.steps = (300000, 340000)
  c.optim.max_iter = 360000
  return c


def vovnet(c, variant, dcn: bool = False):
  """dcn: the *_dcn_* configs (modulated deformable convs in stages 3-5, spec §a)."""
  c.model.backbone.name = "vovnet"
  c.model.backbone.variant = variant
  c.model.backbone.freeze_at = 0
  if dcn:
    c.model.backbone.stage_with_dcn = (False, True, True, True)
  return c


def resnet(c, depth, num_groups=1, width_per_group=64, stride_in_1x1=True):
  b = c.model.backbone
  b.name = "resnet"
  b.variant = f"R-{depth}" if num_groups == 1 else f"X-{depth}-{num_groups}x{width_per_group}d"
  b.depth = depth
  b.num_groups = num_groups
  b.width_per_group = width_per_group
  b.stride_in_1x1 = stride_in_1x1
  b.freeze_at = 2
  return c


def mobilenetv2(c):
  c.model.backbone.name = "mobilenetv2"
  c.model.backbone.variant = "MobileNetV2"
  c.model.backbone.freeze_at = 0
  return c


def _parent(cfg, key: str):
  """Dotted key -> (ConfigDict holding the leaf, leaf name); KeyError naming unknown keys."""
  node = cfg
  *parents, leaf = key.split(".")
  for p in parents + [leaf]:
    if not isinstance(node, ml_collections.ConfigDict) or p not in node:
      raise KeyError(f"unknown config key {key!r}")
    parent, node = node, node[p]
  return parent, leaf


def _set(cfg, key: str, value):
  parent, leaf = _parent(cfg, key)
  setattr(parent, leaf, value)


def _get(cfg, key: str):
  parent, leaf = _parent(cfg, key)
  return parent[leaf]


def load_config(path: str, overrides=None) -> ml_collections.ConfigDict:
  """Loads `configs/NAME.py` (its get_config()) and applies {"a.b": value} overrides.

  Unknown override keys raise KeyError naming the key.
  """
  import importlib.util
  import os
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file not found: {path}")
  spec = importlib.util.spec_from_file_location(
      "centermask_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config()")
  cfg = module.get_config()
  for key, value in (overrides or {}).items():
    _set(cfg, key, value)
  return cfg


# --- command line: the one implementation of `--config PATH` and `--config.KEY=VALUE` ---

class ConfigError(ValueError, errors.UserError):
  """A bad --config file or --config.KEY=VALUE (one-line message)."""


def parse_overrides(extra) -> dict:
  """['--config.a.b=1', '--config.c', 'x'] -> {'a.b': '1', 'c': 'x'} (raw strings).

  Anything else in `extra` raises ConfigError naming it."""
  out, i = {}, 0
  while i < len(extra):
    arg = extra[i]
    if not arg.startswith("--config."):
      raise ConfigError(f"unrecognised argument {arg!r}")
    key = arg[len("--config."):]
    if "=" in key:
      key, raw = key.split("=", 1)
    else:
      if i + 1 >= len(extra):
        raise ConfigError(f"{arg} needs a value")
      i += 1
      raw = extra[i]
    out[key] = raw
    i += 1
  return out


def coerce_value(current, raw: str):
  """Command-line text -> a value of the type of the field's `current` value.

  str fields take the text as is (a quoted Python string is unquoted); bool accepts
  true/false/1/0; other fields take a Python literal (lists become tuples), falling back
  to the text."""
  import ast
  if isinstance(current, str):
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
      try:
        return str(ast.literal_eval(raw))
      except (ValueError, SyntaxError):
        pass
    return raw
  if isinstance(current, bool) and raw.lower() in ("true", "false", "1", "0"):
    return raw.lower() in ("true", "1")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw
  return tuple(value) if isinstance(value, list) else value


def config_from_args(path: str, extra) -> ml_collections.ConfigDict:
  """configs/NAME.py + ['--config.KEY=VALUE', ...] -> config; ConfigError on any problem."""
  try:
    cfg = load_config(path)
  except (FileNotFoundError, ValueError, SyntaxError) as e:
    raise ConfigError(str(e)) from e
  for key, raw in parse_overrides(extra).items():
    try:
      _set(cfg, key, coerce_value(_get(cfg, key), raw))
    except KeyError as e:
      raise ConfigError(e.args[0]) from e
    except (TypeError, ValueError, AttributeError) as e:
      raise ConfigError(f"--config.{key}={raw}: {e}") from e
  return cfg


def config_or_exit(path: str, extra):
  """`config_from_args`, or one `error: ...` line on stderr and exit code 2."""
  import sys
  try:
    return config_from_args(path, extra)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    raise SystemExit(2) from None


def add_config_argument(parser, multiple: bool = False, default=None):
  """Adds `--config configs/NAME.py` (several with multiple=True) to an argparse parser;
  `--config.KEY=VALUE` overrides are then read by `parse_command_line`."""
  kw = dict(nargs="+") if multiple else {}
  if default is None:
    kw["required"] = True
  else:
    kw["default"] = default
  parser.add_argument("--config", metavar="configs/NAME.py", help="config file(s); override "
                      "any key with --config.KEY=VALUE", **kw)


def parse_command_line(parser, argv=None):
  """-> (args, config) (a list of configs when `--config` takes several).

  Unknown arguments, a missing config file and a mistyped or ill-typed --config.KEY all
  print one `error: ...` line to stderr and exit with code 2. args.config_argv keeps the
  raw override arguments (to pass on to subprocesses)."""
  args, extra = parser.parse_known_args(argv)
  if isinstance(args.config, (list, tuple)):
    cfg = [config_or_exit(p, extra) for p in args.config]
  else:
    cfg = config_or_exit(args.config, extra)
  args.config_argv = list(extra)
  return args, cfg


def format_config(cfg) -> str:
  """Every key of `cfg` as `dotted.key = value` lines (values as Python literals), i.e. in
  the form `--config.dotted.key=value` takes."""
  lines = []

  def walk(node, prefix):
    for key in node.keys():
      value = node[key]
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, f"{prefix}{key}.")
      else:
        lines.append(f"{prefix}{key} = {value!r}")
  walk(cfg, "")
  return "\n".join(lines) + "\n"
