#!/usr/bin/env bash
# Creates the project's virtual environment with the right PyTorch build, then the project.
#
#   bash scripts/install.sh [VENV_DIR]        (default .venv)
#
# PyTorch: on a machine with an NVIDIA GPU (nvidia-smi lists one) the default PyPI wheel,
# which is the CUDA build. Without a GPU, the CPU build (about 200 MB instead of several GB):
# first from a local wheelhouse if pip is configured with one (PIP_FIND_LINKS), otherwise from
# the index named by TORCH_CPU_INDEX_URL (PyTorch's CPU wheel index by default).
# TWIN_TORCH_BUILD=cpu|cuda (gpu: cuda) overrides the detection.
set -euo pipefail
venv=${1:-.venv}
torch_version=${TWIN_TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}

build=${TWIN_TORCH_BUILD:-}
case "$build" in
    ""|cpu|cuda) ;;
    gpu) build=cuda ;;  # as in `twin train trainer=gpu`
    *) echo "install.sh: TWIN_TORCH_BUILD=$build: expected cpu or cuda (or unset: detect)" >&2
       exit 2 ;;
esac
if [ -z "$build" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        build=cuda
    else
        build=cpu
    fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)

# A torch outside the project's range would be replaced by the project install below (a
# bare torch from the index: the multi-GB CUDA build), so it is refused here, naming why.
check_torch_range() {  # $1: the torch version, $2: where it comes from
    "$venv/bin/python" - "$1" "$2" "$(dirname "$0")/../pyproject.toml" <<'PY'
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.version import InvalidVersion, Version

version, origin, pyproject = sys.argv[1:]
with open(pyproject, "rb") as file:
    dependencies = [Requirement(d) for d in tomllib.load(file)["project"]["dependencies"]]
allowed = next(d.specifier for d in dependencies if d.name == "torch")
try:
    ok = allowed.contains(Version(version), prereleases=True)
except InvalidVersion:
    ok = False
if not ok:
    sys.exit(f"install.sh: {origin} gives torch {version!r}, outside the project's range "
             f"torch{allowed} (pyproject.toml); pick a version in that range")
PY
}

if installed=$("$venv/bin/python" -c "import torch; print(torch.__version__)" 2>/dev/null); then
    check_torch_range "$installed" "the torch already in $venv"
    if [ "$build" = cuda ] && ! "$venv/bin/python" -c \
            "import sys, torch; sys.exit(torch.version.cuda is None)"; then
        advice="remove $venv (or pip uninstall torch in it) and run this again"
        if [ -n "${TWIN_TORCH_BUILD:-}" ]; then  # asked for, not to be had by keeping it
            echo "install.sh: TWIN_TORCH_BUILD=${TWIN_TORCH_BUILD}, but the torch already in" \
                 "$venv ($installed) is a CPU build; $advice" >&2
            exit 1
        fi
        echo "install.sh: an NVIDIA GPU is here, but the torch already in $venv ($installed)" \
             "is a CPU build: keeping it; for the CUDA build, $advice" >&2
    fi
    echo "install.sh: torch $installed already in $venv, keeping it"
elif ! check_torch_range "$torch_version" "TWIN_TORCH_VERSION"; then
    exit 1
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
        # removed, so that a rerun does not find it and keep it
        "$venv/bin/python" -m pip uninstall --quiet --yes torch
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
