#!/usr/bin/env bash
# Runs an exported artefact from a fresh venv holding only the serving runtime (jax, jaxlib,
# numpy, Pillow, flatbuffers at this project's pins, + onnxruntime for an .onnx artefact),
# with this repository on PYTHONPATH but none of the model/training stack installed (too
# slow for CI; the CI tests are the import guards in tests/test_export.py).
#   benchmarks/runtime_venv.sh ARTEFACT.{stablehlo,onnx} IMAGE [OUT.json]
set -euo pipefail
ART=$1; IMG=$2; OUT=${3:-runtime_venv_preds.json}
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=$(mktemp -d)/rt
pin() { grep -oE "\"$1==[^\"]+\"" "$REPO/pyproject.toml" | tr -d '"'; }
"$PY" -m venv "$VENV"
EXTRA=""
case "$ART" in *.onnx) EXTRA=$(pin onnxruntime) ;; esac
"$VENV/bin/python" -m pip install -q $(pin jax) $(pin jaxlib) $(pin numpy) $(pin pillow) \
    $(pin flatbuffers) $EXTRA
echo "runtime venv $VENV:"; "$VENV/bin/python" -m pip list --format=freeze
PYTHONPATH="$REPO" "$VENV/bin/python" -m centermask_jax.serving "$ART" --input "$IMG" \
    --output "$OUT"
echo "wrote $OUT"
