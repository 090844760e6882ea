#!/usr/bin/env bash
# CPU LoRA training benchmark: `engine finetune` next to PyTorch + PEFT, f32,
# LoRA rank 8 (alpha 16, no dropout) on q,k,v,o,gate,up,down of SmolLM2-135M,
# rows of --seq-len packed tokens, same data, threads, batch and lr, in one run.
# Both report tokens/s = (N-1)·B·seq / time of steps 2..N (step 1 is the
# warm-up) and peak RSS. PyTorch and PEFT are installed into the git-ignored
# .venv from benches/requirements.txt.
#   benches/finetune.sh [--seq-len L] [--batch B] [--steps N] [--threads T] [--lr LR] [--no-build]
# The engine side runs only if `target/release/engine finetune --help` works;
# otherwise the PyTorch side is printed alone.
set -euo pipefail
cd "$(dirname "$0")/.."
seq_len=256 batch=4 steps=6 threads=$(nproc) lr=2e-4 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --seq-len) seq_len=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
model=models/smollm2-135m-instruct
models/fetch.sh
if [ "$build" = 1 ] && ! cargo build --release --quiet; then
  echo "warning: cargo build --release failed; benchmarking what target/release holds" >&2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, peft" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The data: the paragraphs of README.md as {"text"} lines, repeated until the
# packed stream (each text + EOS, as `--pack` builds it) fills batch x steps rows.
data=$work/data.jsonl
.venv/bin/python - "$model" "$data" "$seq_len" "$batch" "$steps" <<'PY'
import json, sys
from tokenizers import Tokenizer
model, out, seq_len, batch, steps = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
tok = Tokenizer.from_file(f"{model}/tokenizer.json")
paras = [p.strip() for p in open("README.md").read().split("\n\n") if len(p.strip()) > 40]
per_pass = sum(len(tok.encode(p, add_special_tokens=False).ids) + 1 for p in paras)
passes = max(1, -(-seq_len * batch * steps // per_pass))
with open(out, "w") as f:
    for _ in range(passes):
        for p in paras:
            f.write(json.dumps({"text": p}) + "\n")
PY

torch_json=$(.venv/bin/python benches/pytorch_lora_train.py --model "$model" --data "$data" \
  --seq-len "$seq_len" --batch "$batch" --steps "$steps" --threads "$threads" --lr "$lr" --json 2>/dev/null)
echo "$torch_json"

engine=target/release/engine
if ! "$engine" finetune --help >/dev/null 2>&1; then
  echo "($engine finetune is not available: PyTorch side only)"
  exit 0
fi

# Peak RSS of the engine: GNU time's "Maximum resident set size", or, without
# /usr/bin/time, the kernel's ru_maxrss of the waited-for child (the same number).
peak_rss_kib() {
  if [ -x /usr/bin/time ]; then
    /usr/bin/time -v -o "$work/time.txt" "$@"
    awk -F: '/Maximum resident set size/ {gsub(/ /, "", $2); print $2}' "$work/time.txt" >"$work/rss"
  else
    python3 -c 'import resource, subprocess, sys
rc = subprocess.call(sys.argv[2:])
open(sys.argv[1], "w").write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))
sys.exit(rc)' "$work/rss" "$@"
  fi
}

# ---- engine side -----------------------------------------------------------
# metrics.jsonl: one record per step with step, loss, tokens_per_s, elapsed_s
# (elapsed_s: seconds since training started, at the end of the step).
peak_rss_kib "$engine" finetune --model "$model" --data "$data" \
  --lora-rank 8 --lora-alpha 16 --lora-targets all --seq-len "$seq_len" --pack \
  --batch "$batch" --steps "$steps" --lr "$lr" --warmup 0 --decay constant --seed 0 \
  --threads "$threads" --device cpu --save-every 0 --eval-every 0 --out "$work/run" \
  >"$work/engine.log" 2>&1 || { echo "engine finetune failed:" >&2; tail -20 "$work/engine.log" >&2; exit 1; }
# -----------------------------------------------------------------------------

python3 - "$torch_json" "$work/run/metrics.jsonl" "$work/rss" "$batch" "$seq_len" "$threads" <<'PY'
import json, sys
t = json.loads(sys.argv[1])
batch, seq_len, threads = map(int, sys.argv[4:7])
steps = [r for r in map(json.loads, open(sys.argv[2])) if "loss" in r]
n = len(steps)
e_tps = (n - 1) * batch * seq_len / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
e_rss = int(open(sys.argv[3]).read().split()[-1]) / 1024
print(json.dumps({"impl": "engine", "tokens_per_s": round(e_tps, 2), "peak_rss_mb": round(e_rss, 1),
                  "losses": [r["loss"] for r in steps], "steps": n}))
print(f"\nSmolLM2-135M LoRA r=8 (q,k,v,o,gate,up,down), f32, {threads} threads, "
      f"batch {batch} x seq {seq_len}, {n} steps (tokens/s over steps 2..{n})")
print(f"{'':16}{'engine':>10}{'pytorch':>10}{'ratio':>8}")
print(f"{'train tok/s':16}{e_tps:>10.1f}{t['tokens_per_s']:>10.1f}{e_tps / t['tokens_per_s']:>7.2f}x")
print(f"{'peak RSS MiB':16}{e_rss:>10.0f}{t['peak_rss_mb']:>10.0f}{e_rss / t['peak_rss_mb']:>7.2f}x")
print(f"{'first loss':16}{steps[0]['loss']:>10.4f}{t['losses'][0]:>10.4f}")
PY
