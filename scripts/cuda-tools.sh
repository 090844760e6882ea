#!/usr/bin/env bash
# Installs the CUDA compile-time tools that need no GPU into .cuda/ at the
# repository root (git-ignored), from the PyPI wheels of CUDA 12.8 update 1:
#
#   nvidia-cuda-nvrtc-cu12    libnvrtc (run-time compiler, loaded by cudarc)
#   nvidia-cuda-runtime-cu12  headers: cuda_runtime.h, cuda_bf16.h, ...
#   nvidia-cuda-nvcc-cu12     ptxas (registers, shared memory and spills)
#
# Then writes .cuda/env.sh, which sets
#
#   LD_LIBRARY_PATH       + the folder holding libnvrtc.so.12
#   ENGINE_CUDA_INCLUDE   the headers folder (NVRTC include path)
#   ENGINE_PTXAS          the ptxas binary
#
# engine also finds these under .cuda/ by itself (src/backend/cuda/nvrtc.rs),
# so sourcing env.sh is only needed for libnvrtc outside the repository root.
#
# Usage: scripts/cuda-tools.sh            install (once; a stamp file skips it after)
#        scripts/cuda-tools.sh --force    reinstall
#        source .cuda/env.sh
set -euo pipefail

NVRTC_VERSION=12.8.93
RUNTIME_VERSION=12.8.90
NVCC_VERSION=12.8.93

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$root/.cuda"
site="$dest/site"
stamp="$dest/.installed"
want="nvrtc=$NVRTC_VERSION runtime=$RUNTIME_VERSION nvcc=$NVCC_VERSION"

if [[ "${1:-}" == "--force" ]]; then
    rm -rf "$dest"
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "cuda-tools: already installed in $dest ($want)" >&2
else
    python="${PYTHON:-python3}"
    if ! command -v "$python" >/dev/null; then
        echo "cuda-tools: $python not found; install Python 3 with pip" >&2
        exit 1
    fi
    rm -rf "$site" "$stamp"
    mkdir -p "$dest"
    echo "cuda-tools: installing $want into $dest" >&2
    if ! PIP_ROOT_USER_ACTION=ignore "$python" -m pip install --quiet --disable-pip-version-check --no-deps \
        --target "$site" \
        "nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" \
        "nvidia-cuda-runtime-cu12==$RUNTIME_VERSION" \
        "nvidia-cuda-nvcc-cu12==$NVCC_VERSION"; then
        rm -rf "$site"
        echo "cuda-tools: pip could not install the CUDA wheels." >&2
        echo "  Is PyPI reachable (a proxy, PIP_INDEX_URL)? Try:" >&2
        echo "  $python -m pip download --no-deps nvidia-cuda-nvrtc-cu12==$NVRTC_VERSION" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
fi

nv="$site/nvidia"
lib="$nv/cuda_nvrtc/lib"
include="$nv/cuda_runtime/include"
ptxas="$nv/cuda_nvcc/bin/ptxas"
for f in "$lib/libnvrtc.so.12" "$include/cuda_bf16.h" "$ptxas"; do
    if [[ ! -e "$f" ]]; then
        echo "cuda-tools: expected $f after install; run $0 --force" >&2
        exit 1
    fi
done
chmod +x "$ptxas"
# cudarc's dynamic loading asks for libnvrtc.so; the wheel ships only .so.12.
ln -sf libnvrtc.so.12 "$lib/libnvrtc.so"

cat >"$dest/env.sh" <<EOF
# Written by scripts/cuda-tools.sh: source it to use the CUDA tools in .cuda/.
export LD_LIBRARY_PATH="$lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export ENGINE_CUDA_INCLUDE="$include"
export ENGINE_PTXAS="$ptxas"
EOF
echo "cuda-tools: ready; environment in $dest/env.sh:" >&2
cat "$dest/env.sh"
