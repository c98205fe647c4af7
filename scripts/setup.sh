#!/usr/bin/env bash
# Installs the Debian packages cumo builds and tests with, if any are missing. Idempotent; needs root (or sudo).
set -euo pipefail
# CUMO_SKIP_SETUP=1: the packages are there another way (a machine without apt access, e.g. unpacked .debs)
if [ "${CUMO_SKIP_SETUP:-}" = 1 ]; then
  echo "setup.sh: skipped (CUMO_SKIP_SETUP=1)"
  exit 0
fi
packages=(
  cmake g++ make pkg-config ccache
  libeigen3-dev          # CPU backend
  nlohmann-json3-dev     # safetensors headers, configs
  libstb-dev             # image loading (PNG/JPEG)
  doctest-dev            # tests
  libbenchmark-dev       # benchmarks
  libsentencepiece-dev   # tokenizer.model support (optional in the library, used by the tools and tests)
  libdnnl-dev            # oneDNN: the CPU backend's fp32 GEMMs (optional in the library, used by our tools and tests)
  libopenblas-dev        # optional BLAS for the CPU GEMMs (benchmarked beside Eigen's own)
  openmpi-bin libopenmpi-dev  # optional MPI for multi-process data parallelism (tests: ctest -L distributed)
  procps                 # pgrep: the distributed fault tests find the ranks they kill
  clang libclang-rt-14-dev  # libFuzzer harness for the safetensors parser
  python3
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup.sh: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "setup.sh: all packages present"
fi
