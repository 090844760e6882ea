#!/usr/bin/env bash
# CPU LoRA training benchmark: `engine finetune` next to PyTorch + PEFT, f32,
# LoRA rank 8 (alpha 16, no dropout) on q,k,v,o,gate,up,down of SmolLM2-135M,
# rows of --seq-len packed tokens, same data, threads and batch, in one run.
# Both report tokens/s over steps 2..N (step 1 is the warm-up) and peak RSS.
#   benches/finetune.sh [--seq-len L] [--batch B] [--steps N] [--threads T]
set -euo pipefail
cd "$(dirname "$0")/.."
seq_len=256 batch=4 steps=6 threads=$(nproc)
while [ $# -gt 0 ]; do
  case "$1" in
    --seq-len) seq_len=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
model=models/smollm2-135m-instruct
models/fetch.sh
cargo build --release --quiet
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, peft" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The data: the paragraphs of README.md as {"text"} lines, four times over.
python3 - "$work/data.jsonl" <<'PY'
import json, sys
paras = [p for p in open("README.md").read().split("\n\n") if len(p) > 40]
with open(sys.argv[1], "w") as f:
    for p in paras * 4:
        f.write(json.dumps({"text": p}) + "\n")
PY
torch_json=$(.venv/bin/python benches/pytorch_lora_train.py --model "$model" --data "$work/data.jsonl" \
  --seq-len "$seq_len" --batch "$batch" --steps "$steps" --threads "$threads" 2>/dev/null)
/usr/bin/time -f "%M" -o "$work/rss" target/release/engine finetune --model "$model" \
  --data "$work/data.jsonl" --lora-rank 8 --lora-alpha 16 --lora-targets all --pack \
  --seq-len "$seq_len" --batch "$batch" --steps "$steps" --lr 2e-4 --warmup 0 --save-every 0 \
  --eval-every 0 --threads "$threads" --device cpu --out "$work/run" >/dev/null 2>&1
echo "$torch_json"
python3 - "$torch_json" "$work/run/metrics.jsonl" "$work/rss" "$threads" <<'PY'
import json, sys
t = json.loads(sys.argv[1])
steps = [json.loads(l) for l in open(sys.argv[2]) if '"loss"' in l]
tokens = sum(r["tokens"] for r in steps[1:])
e_tps = tokens / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
e_rss = int(open(sys.argv[3]).read().split()[-1]) / 1024
print(json.dumps({"impl": "engine", "tokens_per_s": e_tps, "peak_rss_mb": e_rss,
                  "losses": [r["loss"] for r in steps]}))
print(f"\nSmolLM2-135M LoRA r=8 (q,k,v,o,gate,up,down), f32, {sys.argv[4]} threads, "
      f"batch {t['batch']} x seq {t['seq_len']}, {t['steps']} steps")
print(f"{'':16}{'engine':>10}{'pytorch':>10}{'ratio':>8}")
print(f"{'train tok/s':16}{e_tps:>10.1f}{t['tokens_per_s']:>10.1f}{e_tps / t['tokens_per_s']:>7.2f}x")
print(f"{'peak RSS MiB':16}{e_rss:>10.0f}{t['peak_rss_mb']:>10.0f}{e_rss / t['peak_rss_mb']:>7.2f}x")
PY
