#!/usr/bin/env bash
# Builds llama.cpp's own tools, once, from the llama.cpp sources that the
# llama-cpp-python sdist on PyPI vendors, into the git-ignored .bench/llama.cpp/
# (CPU only, Release, -DGGML_NATIVE=ON), and prints the folder holding them.
# The benchmarks that run llama.cpp beside engine (serve.sh, quantized.sh)
# call it; --f32-gguf / --bf16-gguf also convert models/smollm2-135m-instruct
# with that tree's convert_hf_to_gguf.py (cached beside the build).
#   benches/llama-cpp.sh [--version V] [--f32-gguf] [--bf16-gguf] TARGET...
# e.g. benches/llama-cpp.sh llama-server llama-bench → .bench/llama.cpp/build-0.3.36/bin
# Needs .venv from benches/requirements.txt (the sdist's metadata, the
# converter's torch); cmake from PyPI where the system has none.
set -euo pipefail
cd "$(dirname "$0")/.."
version=0.3.36 targets=() convert=()
while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=$2; shift 2 ;;
    --f32-gguf) convert+=(f32); shift ;;
    --bf16-gguf) convert+=(bf16); shift ;;
    -*) echo "unknown argument $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
bench=.bench/llama.cpp
src=$bench/llama_cpp_python-$version/vendor/llama.cpp
build=$bench/build-$version
mkdir -p "$bench"
cmake=cmake
if ! command -v cmake >/dev/null; then
  [ -x .venv/bin/cmake ] || .venv/bin/pip install --quiet cmake
  cmake=$PWD/.venv/bin/cmake
fi
if [ ! -f "$src/CMakeLists.txt" ]; then
  sdist=$bench/llama_cpp_python-$version.tar.gz
  if [ ! -s "$sdist" ]; then
    # pip reads the sdist's metadata, which needs its build backend; without
    # build isolation it does not build cmake from source to get it.
    .venv/bin/pip install --quiet scikit-build-core
    .venv/bin/pip download --quiet --no-deps --no-build-isolation --no-binary :all: \
      "llama-cpp-python==$version" -d "$bench"
  fi
  tar xzf "$sdist" -C "$bench"
fi
for target in "${targets[@]}"; do
  [ -x "$build/bin/$target" ] && continue
  echo "building $target from llama-cpp-python $version's vendor/llama.cpp (once; long on few cores)" >&2
  # The sdist's own .git dates the sources; stop git from looking further up
  # (into this repository) for build-info.
  if [ ! -f "$build/CMakeCache.txt" ]; then
    GIT_CEILING_DIRECTORIES=$PWD/$bench "$cmake" -S "$src" -B "$build" \
      -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_APP=OFF -DBUILD_SHARED_LIBS=OFF > "$bench/cmake-$version.log"
  fi
  GIT_CEILING_DIRECTORIES=$PWD/$bench "$cmake" --build "$build" --target "$target" -j"$(nproc)" \
    > "$bench/build-$target-$version.log" \
    || { tail -20 "$bench/build-$target-$version.log" >&2; exit 1; }
done
for type in "${convert[@]}"; do
  gguf=$bench/smollm2-135m-instruct-$type.gguf
  [ -s "$gguf" ] && continue
  echo "converting models/smollm2-135m-instruct to a $type GGUF with llama.cpp's convert_hf_to_gguf.py" >&2
  .venv/bin/python "$src/convert_hf_to_gguf.py" models/smollm2-135m-instruct --outtype "$type" \
    --outfile "$gguf.tmp" > "$bench/convert-$type.log" 2>&1 \
    || { tail -20 "$bench/convert-$type.log" >&2; exit 1; }
  mv "$gguf.tmp" "$gguf"
done
echo "$build/bin"
