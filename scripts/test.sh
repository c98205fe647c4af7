#!/usr/bin/env bash
# The test command: install what is missing, configure, build (-j2) and run the default test set.
# Heavy cases (long fuzzing, big shapes) are labelled `heavy`: run them with  ctest --test-dir build -L heavy
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
BUILD=${BUILD:-build}
cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release ${CUMO_CMAKE_ARGS:-}
cmake --build "$BUILD" -j2
ctest --test-dir "$BUILD" -LE heavy --output-on-failure -j2
