#!/usr/bin/env bash
# CPU inference benchmark: engine next to PyTorch (transformers), f32, batch 1,
# same model, prompt ids and threads, in one run. PyTorch is installed into the
# git-ignored .venv from benches/requirements.txt.
#   benches/inference.sh [--prompt-tokens N] [--decode-tokens M] [--threads T] [--repeats R]
set -euo pipefail
cd "$(dirname "$0")/.."
prompt_tokens=128 decode_tokens=64 threads=$(nproc) repeats=3
while [ $# -gt 0 ]; do
  case "$1" in
    --prompt-tokens) prompt_tokens=$2; shift 2 ;;
    --decode-tokens) decode_tokens=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
model=models/smollm2-135m-instruct
models/fetch.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi
ids=$(mktemp --suffix=.json)
trap 'rm -f "$ids"' EXIT
common=(--decode-tokens "$decode_tokens" --threads "$threads" --repeats "$repeats")
torch_json=$(.venv/bin/python benches/pytorch_inference.py --model "$model" \
  --prompt-tokens "$prompt_tokens" --dump-prompt-ids "$ids" "${common[@]}")
engine_json=$(cargo bench --quiet --bench inference -- --model "$model" --prompt-ids "$ids" "${common[@]}")
echo "$torch_json"
echo "$engine_json"
python3 - "$torch_json" "$engine_json" <<'PY'
import json, sys
t, e = (json.loads(s) for s in sys.argv[1:])
print(f"\nSmolLM2-135M, f32, batch 1, {e['threads']} threads, prompt {e['prompt_tokens']} tokens, decode {e['decode_tokens']}")
print(f"{'':14}{'engine':>10}{'pytorch':>10}{'ratio':>8}")
for key, name in [("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s")]:
    print(f"{name:14}{e[key]:>10.1f}{t[key]:>10.1f}{e[key] / t[key]:>7.2f}x")
print(f"{'peak RSS MiB':14}{e['peak_rss_mb']:>10.0f}{t['peak_rss_mb']:>10.0f}{e['peak_rss_mb'] / t['peak_rss_mb']:>7.2f}x")
PY
