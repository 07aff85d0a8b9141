#!/usr/bin/env bash
# Sets up the optional TorchRec baseline of bench/torchrec_baseline.py (issue 4) in a
# virtualenv of its own; idempotent: a second run only checks the imports. Nothing here is
# needed by `make test`.
#
#   bash bench/install_torchrec.sh            # then: python bench/torchrec_baseline.py
#
# Why a separate venv: FBGEMM's compiled ops must match the torch they load into, and
# neither fbgemm-gpu-cpu 1.8.0 nor 1.9.0 loads into the project's torch 2.15 (undefined
# c10/autograd symbols). The pair known to run on CPU is torch 2.13 + fbgemm-gpu-cpu 1.8.0
# + torchrec 1.8.0, the last two installed with --no-deps (torchrec asks for the CUDA
# `fbgemm-gpu`). The PyPI torch 2.13.0 wheel pulls its CUDA 13 libraries (about 4 GB
# installed): the CPU-only wheel index is not on PyPI. bench/torchrec_baseline.py finds
# this venv at $STREAMREC_TORCHREC_PYTHON (default below) and runs itself under it.
#
# Env: STREAMREC_TORCHREC_VENV (default ~/.cache/streamrec/torchrec-venv),
#      PYTHON (a Python 3.11 to build it from; default python3.11).
set -euo pipefail

VENV="${STREAMREC_TORCHREC_VENV:-$HOME/.cache/streamrec/torchrec-venv}"
PYTHON="${PYTHON:-python3.11}"
TORCH_VERSION=2.13.0
TORCHREC_VERSION=1.8.0
FBGEMM_VERSION=1.8.0

check() {
    "$VENV/bin/python" - "$TORCH_VERSION" "$TORCHREC_VERSION" "$FBGEMM_VERSION" <<'EOF'
import sys
import fbgemm_gpu, torch, torchrec
from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection  # noqa: F401
from torchrec.modules.mc_modules import MCHManagedCollisionModule  # noqa: F401
want = sys.argv[1:]
got = [torch.__version__.split("+")[0], torchrec.__version__, fbgemm_gpu.__version__]
if got != want:
    sys.exit(f"versions {got} != {want}")
torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3]))
print(f"torch {got[0]} + torchrec {got[1]} + fbgemm-gpu-cpu {got[2]}: OK ({sys.executable})")
EOF
}

if [[ -x "$VENV/bin/python" ]] && check 2>/dev/null; then
    exit 0
fi

echo "[install_torchrec] building $VENV" >&2
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "need Python 3.11")'
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
# torch and what bench/torchrec_baseline.py imports from this repo (streaming, trainer.model).
"${PIP[@]}" "torch==$TORCH_VERSION" numpy pydantic orjson
# torchrec's own dependencies without their resolver (it would swap torch or fetch CUDA fbgemm).
"${PIP[@]}" --no-deps \
    "fbgemm-gpu-cpu==$FBGEMM_VERSION" \
    "torchrec==$TORCHREC_VERSION" \
    tensordict==0.15.3 pyvers==0.2.3 cloudpickle \
    torchmetrics==1.0.3 lightning-utilities packaging tqdm \
    pyre-extensions typing-inspect mypy-extensions
check
