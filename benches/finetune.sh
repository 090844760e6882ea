#!/usr/bin/env bash
# LoRA training benchmark: `engine finetune` next to PyTorch + PEFT, LoRA rank
# 8 (alpha 16, no dropout) on q,k,v,o,gate,up,down of SmolLM2-135M, rows of
# --seq-len packed tokens, same data, threads, batch and lr, in one run.
# Both report tokens/s = (N-1)·B·seq / time of steps 2..N (step 1 is the
# warm-up) and peak memory. PyTorch and PEFT are installed into the git-ignored
# .venv from benches/requirements.txt.
#   benches/finetune.sh [--device cpu|cuda] [--seq-len L] [--batch B] [--steps N]
#                       [--threads T] [--lr LR] [--no-build]
# The engine side runs only if `target/release/engine finetune --help` works;
# otherwise the PyTorch side is printed alone.
#
# --device cpu (the default): both in f32 on the CPU; peak RSS.
# --device cuda: GPU 0, `engine finetune --device cuda` (bf16 weights and
# activations, f32 accumulation, f32 LoRA master weights and AdamW state)
# next to PyTorch with the same split (bf16 base weights, bf16 autocast, f32
# LoRA and AdamW; see benches/pytorch_lora_train.py). Peak GPU memory of each
# process by polling nvidia-smi every 0.1 s (CUDA context included, so the two
# columns compare), and PyTorch's own torch.cuda.max_memory_allocated; engine
# reports its activations' memory (act_mib in metrics.jsonl) where it has it.
# Default 20 steps on a GPU (a step takes milliseconds). Not run on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
seq_len=256 batch=4 steps= threads=$(nproc) lr=2e-4 build=1 device=cpu
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=$2; shift 2 ;;
    --seq-len) seq_len=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --lr) lr=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$device" in
  cpu) steps=${steps:-6} ;;
  cuda)
    steps=${steps:-20}
    # Fail at once, in one line, where there is no GPU to run on.
    if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null) || [ -z "$gpu" ]; then
      echo "benches/finetune.sh: --device cuda needs an NVIDIA GPU and its driver, and nvidia-smi finds none here (without one: --device cpu)" >&2
      exit 1
    fi ;;
  *) echo "--device must be cpu or cuda, not $device" >&2; exit 2 ;;
esac
model=models/smollm2-135m-instruct
models/fetch.sh
# NVRTC for engine's kernels (engine finds .cuda/ by itself).
if [ "$device" = cuda ]; then scripts/cuda-tools.sh; fi
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

# GPU mode: runs a command and writes {"gpu_peak_mib", "how", "rss_kib"} to
# $1: the command's process's peak memory on GPU 0 as nvidia-smi lists it,
# polled every 0.1 s, or, where the driver lists no process (some containers),
# the peak growth of the GPU's used memory over the run; and its peak RSS.
gpu_peak() {
  python3 -c 'import json, resource, subprocess, sys, time
def smi(*query):
    try:
        r = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"],
                           capture_output=True, text=True, timeout=10)
        return [[f.strip() for f in line.split(",")] for line in r.stdout.splitlines() if line.strip()]
    except Exception:
        return []
def used():
    rows = smi("--query-gpu=memory.used", "-i", "0")
    try:
        return float(rows[0][0])
    except (IndexError, ValueError):
        return 0.0
base = used()
p = subprocess.Popen(sys.argv[2:])
proc = dev = 0.0
while p.poll() is None:
    for row in smi("--query-compute-apps=pid,used_memory"):
        try:
            if int(row[0]) == p.pid:
                proc = max(proc, float(row[1]))
        except (IndexError, ValueError):
            pass
    dev = max(dev, used() - base)
    time.sleep(0.1)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
json.dump({"gpu_peak_mib": proc or dev, "how": "process" if proc else "device growth",
           "rss_kib": rss}, open(sys.argv[1], "w"))
sys.exit(p.returncode)' "$@"
}

torch_args=(--model "$model" --data "$data" --seq-len "$seq_len" --batch "$batch" --steps "$steps"
  --threads "$threads" --lr "$lr" --json)
if [ "$device" = cpu ]; then
  torch_json=$(.venv/bin/python benches/pytorch_lora_train.py "${torch_args[@]}" 2>/dev/null)
else
  torch_json=$(gpu_peak "$work/torch_gpu.json" .venv/bin/python benches/pytorch_lora_train.py \
    "${torch_args[@]}" --device cuda 2>/dev/null)
fi
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
engine_args=(finetune --model "$model" --data "$data"
  --lora-rank 8 --lora-alpha 16 --lora-targets all --seq-len "$seq_len" --pack
  --batch "$batch" --steps "$steps" --lr "$lr" --warmup 0 --decay constant --seed 0
  --threads "$threads" --device "$device" --save-every 0 --eval-every 0 --out "$work/run")
if [ "$device" = cpu ]; then
  peak_rss_kib "$engine" "${engine_args[@]}" \
    >"$work/engine.log" 2>&1 || { echo "engine finetune failed:" >&2; tail -20 "$work/engine.log" >&2; exit 1; }
else
  gpu_peak "$work/engine_gpu.json" "$engine" "${engine_args[@]}" \
    >"$work/engine.log" 2>&1 || { echo "engine finetune failed:" >&2; tail -20 "$work/engine.log" >&2; exit 1; }
fi
# -----------------------------------------------------------------------------

if [ "$device" = cuda ]; then
  python3 - "$torch_json" "$work/run/metrics.jsonl" "$work/engine_gpu.json" "$work/torch_gpu.json" \
    "$batch" "$seq_len" "$gpu" <<'PY'
import json, math, sys
t = json.loads(sys.argv[1])
eg, tg = json.load(open(sys.argv[3])), json.load(open(sys.argv[4]))
batch, seq_len, gpu = int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
steps = [r for r in map(json.loads, open(sys.argv[2])) if "loss" in r]
n = len(steps)
e_tps = (n - 1) * batch * seq_len / (steps[-1]["elapsed_s"] - steps[0]["elapsed_s"])
act = max((r["act_mib"] for r in steps if isinstance(r.get("act_mib"), (int, float))), default=math.nan)
e_rss, t_rss = eg["rss_kib"] / 1024, t["peak_rss_mb"]
print(json.dumps({"impl": "engine", "device": "cuda", "tokens_per_s": round(e_tps, 2),
                  "gpu_peak_mib": eg["gpu_peak_mib"], "gpu_peak_how": eg["how"],
                  "act_mib": None if math.isnan(act) else act,
                  "peak_rss_mb": round(e_rss, 1), "losses": [r["loss"] for r in steps], "steps": n}))
print(f"\nSmolLM2-135M LoRA r=8 (q,k,v,o,gate,up,down) on {gpu}: engine bf16 (f32 LoRA + AdamW), "
      f"PyTorch bf16 weights + autocast (f32 LoRA + AdamW); batch {batch} x seq {seq_len}, "
      f"{n} steps (tokens/s over steps 2..{n})")
print(f"{'':30}{'engine':>10}{'pytorch':>10}{'ratio':>8}")
print(f"{'train tok/s':30}{e_tps:>10.1f}{t['tokens_per_s']:>10.1f}{e_tps / t['tokens_per_s']:>7.2f}x")
print(f"{'GPU peak MiB (nvidia-smi)':30}{eg['gpu_peak_mib']:>10.0f}{tg['gpu_peak_mib']:>10.0f}"
      f"{eg['gpu_peak_mib'] / max(tg['gpu_peak_mib'], 1):>7.2f}x")
print(f"{'torch max_memory_allocated':30}{'-':>10}{t['max_memory_allocated_mb']:>10.0f}")
print(f"{'engine activations (act_mib)':30}{'-' if math.isnan(act) else f'{act:.0f}':>10}{'-':>10}")
print(f"{'peak RSS MiB':30}{e_rss:>10.0f}{t_rss:>10.0f}{e_rss / t_rss:>7.2f}x")
print(f"{'first loss':30}{steps[0]['loss']:>10.4f}{t['losses'][0]:>10.4f}")
if eg["how"] != "process" or tg["how"] != "process":
    print(f"(GPU peak: engine {eg['how']}, pytorch {tg['how']}: nvidia-smi did not list "
          "both processes; device growth counts whatever else ran on the GPU)")
PY
  exit 0
fi

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
