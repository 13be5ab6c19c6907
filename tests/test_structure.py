"""Package structure: every module imports, the import graph (module level and inside
functions) has no cycle, and dependencies point one way:
ops <- models <- training / evaluation <- tools (checkpoints never import training);
importing a module sets no environment variable."""
import ast
import importlib
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "centermask_jax"


def _modules():
  out = {}
  for path in sorted(PKG.rglob("*.py")):
    parts = path.relative_to(REPO).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


MODULES = _modules()


def _imports(path):
  """centermask_jax modules imported anywhere in the file (incl. function bodies)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    else:
      continue
    for n in names:
      while n and n not in MODULES:
        n = n.rpartition(".")[0]
      if n and n != "centermask_jax":
        found.add(n)
  return found


GRAPH = {m: _imports(p) - {m} for m, p in MODULES.items()}


# Modules of an optional extra -> the package they need (skipped without it).
OPTIONAL = {"centermask_jax.tools.export_onnx": "jax2onnx"}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_module_imports(module):
  if module in OPTIONAL:
    pytest.importorskip(OPTIONAL[module])
  importlib.import_module(module)


def _top_level_nodes(tree):
  """Nodes executed at import time (outside function bodies)."""
  todo = list(tree.body)
  while todo:
    node = todo.pop()
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue
    yield node
    todo.extend(ast.iter_child_nodes(node))


def test_no_environment_or_global_config_change_at_import():
  """No module sets os.environ or jax.config when imported (parity's precision is set
  inside its run())."""
  bad = []
  for m, path in MODULES.items():
    for node in _top_level_nodes(ast.parse(path.read_text())):
      text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign)) else ""
      if isinstance(node, ast.Call) and (
          "os.environ." in text.split("(")[0] or text.startswith("os.putenv")
          or text.startswith("jax.config.update")):
        if not text.startswith("os.environ.get("):
          bad.append(f"{m}: {text}")
      if isinstance(node, ast.Assign) and any("os.environ[" in ast.unparse(t)
                                              for t in node.targets):
        bad.append(f"{m}: {text}")
  assert not bad, "\n".join(bad)


def test_no_import_cycle():
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(GRAPH[m]):
      if state.get(n) == "open":
        cycle = stack[stack.index(n):] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


# package -> packages it must not import (the layering above)
FORBIDDEN = {
    "centermask_jax.ops": ("models", "training", "evaluation", "tools", "checkpoints", "data",
                           "predictor", "parallel"),
    "centermask_jax.models": ("training", "evaluation", "tools", "data", "predictor"),
    "centermask_jax.checkpoints": ("training", "evaluation", "tools"),
    "centermask_jax.training": ("tools",),
    "centermask_jax.evaluation": ("training", "tools"),
    "centermask_jax.data": ("models", "training", "evaluation", "tools"),
}


def test_dependencies_point_one_way():
  bad = []
  for m, deps in GRAPH.items():
    for pkg, banned in FORBIDDEN.items():
      if m == pkg or m.startswith(pkg + "."):
        bad += [f"{m} imports {d}" for d in sorted(deps)
                if any(d == f"centermask_jax.{b}" or d.startswith(f"centermask_jax.{b}.")
                       for b in banned)]
  assert not bad, "\n".join(bad)


def test_the_region_rule_has_one_home():
  """Only ops/padding.py defines the region helpers."""
  names = ("region_mask", "masked_mean", "official_map_hw", "official_padded_hw", "apply_mask")
  homes = {}
  for m, path in MODULES.items():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.FunctionDef) and node.name in names:
        homes.setdefault(node.name, []).append(m)
  assert homes and all(v == ["centermask_jax.ops.padding"] for v in homes.values()), homes
