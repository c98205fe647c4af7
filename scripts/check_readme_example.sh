#!/usr/bin/env bash
# Proves the README's C++ example compiles, as written, against the *installed* package:
# install cumo into a scratch prefix, extract the example from README.md, build it in a separate project with
# find_package(cumo CONFIG REQUIRED) + cumo::cumo, and run it.
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
build=${1:?usage: check_readme_example.sh BUILD_DIR [WORK_DIR]}
work=${2:-$(mktemp -d)}
rm -rf "$work" && mkdir -p "$work/consumer"
cmake --install "$build" --prefix "$work/prefix" >/dev/null
# the first ```cpp block of the README
awk '/^```cpp$/{f=1;next} /^```$/{if(f){exit}} f' "$src/README.md" >"$work/consumer/main.cpp"
test -s "$work/consumer/main.cpp" || { echo "no \`\`\`cpp block found in README.md"; exit 1; }
cat >"$work/consumer/CMakeLists.txt" <<'CMAKE'
cmake_minimum_required(VERSION 3.25)
project(readme_example LANGUAGES CXX)
find_package(cumo CONFIG REQUIRED)
add_executable(readme_example main.cpp)
target_link_libraries(readme_example PRIVATE cumo::cumo)
CMAKE
cmake -S "$work/consumer" -B "$work/consumer/build" -DCMAKE_PREFIX_PATH="$work/prefix" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$work/consumer/build" >/dev/null
"$work/consumer/build/readme_example"
