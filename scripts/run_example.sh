#!/usr/bin/env bash
# The main job for now: build and run the MoE block example (the CuMo training example will take its place).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD:-build}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release
cmake --build "$BUILD" -j2 --target example_00_moe_block
"$BUILD/examples/example_00_moe_block"
