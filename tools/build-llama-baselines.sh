#!/usr/bin/env bash
# Build llama.cpp's own llama-server and llama-batched-bench from the sources vendored in the
# llama-cpp-python sdist that tokenmill pins (the same llama.cpp its engine runs), for
#   tokenmill bench --spawn --modes batch --cpp-baselines DIR
# Usage: tools/build-llama-baselines.sh [DIR]   (default .cache/llama-baselines; about 5 minutes on 2 cores)
set -euo pipefail
out="${1:-.cache/llama-baselines}"
version=$(python -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
# GGML_NATIVE: built for this CPU, as pip builds llama-cpp-python's own copy here
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON \
  -DLLAMA_BUILD_SERVER=ON > "$work/cmake.log"
cmake --build "$work/build" --target llama-server llama-batched-bench -j "$(nproc)" > "$work/build.log"
mkdir -p "$out"
cp "$work/build/bin/llama-server" "$work/build/bin/llama-batched-bench" "$out/"
echo "built llama-server and llama-batched-bench (llama.cpp of llama-cpp-python $version) in $out"
