#!/usr/bin/env bash
# Creates the project's virtual environment with the right PyTorch build, then the project.
#
#   bash scripts/install.sh [VENV_DIR]        (default .venv)
#
# PyTorch: on a machine with an NVIDIA GPU (nvidia-smi lists one) the default PyPI wheel,
# which is the CUDA build. Without a GPU, the CPU build (about 200 MB instead of several GB):
# first from a local wheelhouse if pip is configured with one (PIP_FIND_LINKS), otherwise from
# the index named by TORCH_CPU_INDEX_URL (PyTorch's CPU wheel index by default).
# TWIN_TORCH_BUILD=cpu|cuda overrides the detection.
set -euo pipefail
venv=${1:-.venv}
torch_version=${TWIN_TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}

build=${TWIN_TORCH_BUILD:-}
if [ -z "$build" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        build=cuda
    else
        build=cpu
    fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

if "$venv/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "install.sh: torch already in $venv, keeping it"
elif [ "$build" = cuda ]; then
    echo "install.sh: NVIDIA GPU found, installing CUDA torch==$torch_version"
    # A wheelhouse in pip's find-links may hold the CPU build, whose local version
    # $torch_version+cpu satisfies ==$torch_version and sorts first: find-links is pointed at an
    # empty folder for this one install (the configured indexes stay).
    no_wheelhouse=$(mktemp -d)
    PIP_FIND_LINKS="$no_wheelhouse" "${pip[@]}" "torch==$torch_version"
    rmdir "$no_wheelhouse"
    if ! "$venv/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)"; then
        echo "install.sh: TWIN_TORCH_BUILD=cuda, but pip installed a CPU build of torch" \
             "($("$venv/bin/python" -c "import torch; print(torch.__version__)")); check pip's" \
             "index configuration (pip config list)" >&2
        exit 1
    fi
else
    echo "install.sh: no GPU, installing CPU torch==$torch_version"
    # --no-index: only the local wheelhouse, so a machine without one fails fast here
    # instead of pulling the multi-GB CUDA wheel from PyPI.
    if ! "${pip[@]}" --no-index --no-deps "torch==$torch_version+cpu" 2>/dev/null; then
        "${pip[@]}" --no-deps "torch==$torch_version" \
            --index-url "${TORCH_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
    fi
fi

# torch is in place, so the project's torch range installs nothing more.
"${pip[@]}" -e ".[serve,dev]"
touch "$venv/.installed"
echo "install.sh: environment ready in $venv"
