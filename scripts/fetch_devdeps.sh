#!/usr/bin/env bash
# Downloads (here, where apt works) the Debian packages a bare GPU machine needs to build cumo's CUDA targets —
# headers and one small library, ~2.3 MB of .debs — into .devdeps/ (git-ignored), for scripts/gpu_check.sh --quick,
# which unpacks them there (a lent device machine reaches no package registry). Carry the folder with the call:
#   bash scripts/fetch_devdeps.sh      # once, here
#   device run: carry [".devdeps"], command "bash scripts/gpu_check.sh --quick"
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .devdeps
cd .devdeps
rm -f ./*.deb
apt-get download libeigen3-dev nlohmann-json3-dev doctest-dev libbenchmark-dev libbenchmark1debian libstb-dev
ls -l ./*.deb
