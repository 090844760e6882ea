#!/usr/bin/env bash
# Serving benchmark: `engine serve` next to llama.cpp's `llama-server`, in one
# run, on the same model (SmolLM2-135M-Instruct, f32 weights and f32 KV cache),
# the same threads and the same requests. benches/serve_load.py replays a fixed
# set of prompts (32-256 tokens, made deterministically) as streaming
# /v1/completions with 128 output tokens (ignore_eos, temperature 0) at
# concurrency 1, 4, 16 and 64, keeping exactly that many requests in flight, and
# reports requests/s, output tokens/s, time to first token and time per output
# token (p50, p99), and each server's peak RSS; then 256-token prompts at
# concurrency 16 for the TTFT target. Both servers run side by side for the
# whole run and each level goes to both back to back, so that other work on a
# shared machine slows both alike; compare the two columns of one run.
#   benches/serve.sh [--threads T] [--device cpu|cuda] [--quick] [--no-build]
#                    [--no-peer] [--llama-cpp-python VERSION] [--gguf FILE]
#
# --gguf FILE: both servers serve that GGUF as it is (e.g. one `engine
# quantize` wrote) instead of the f32 weights.
#
# The peer: llama-server built by benches/llama-cpp.sh (once, CPU only, Release,
# -DGGML_NATIVE=ON) from the llama.cpp sources that the llama-cpp-python sdist on PyPI vendors, into
# the git-ignored .bench/llama.cpp/; the model as an f32 GGUF made from
# models/smollm2-135m-instruct by the converter in those sources
# (convert_hf_to_gguf.py --outtype f32), cached there too. Both servers get
# room for 64 sequences of 512 tokens: engine --max-seqs 64 --kv-cache-mib 1440
# (f32 KV: 46 080 bytes a token), llama-server -np 64 -c 32768 -ctk f32 -ctv f32
# with continuous batching. The Python side (PyTorch for the converter, httpx and
# tokenizers for the load generator) goes into the git-ignored .venv from
# benches/requirements.txt; cmake from PyPI where the system has none.
#
# --device cuda runs engine on GPU 0; the peer is then skipped, because the
# llama-server built here is CPU-only (a GPU comparison needs a llama-server
# built with -DGGML_CUDA=ON, which this script does not do).
# --quick: a smoke run (fewer requests, 32 output tokens); its numbers are not
# the benchmark's.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=$(nproc) device=cpu quick=0 build=1 peer=1 llama_py=0.3.36 served_gguf=''
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --no-build) build=0; shift ;;
    --no-peer) peer=0; shift ;;
    --llama-cpp-python) llama_py=$2; shift 2 ;;
    --gguf) served_gguf=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$device" in
  cpu) ;;
  cuda)
    if ! gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null) || [ -z "$gpu" ]; then
      echo "benches/serve.sh: --device cuda needs an NVIDIA GPU and its driver, and nvidia-smi finds none here (without one: --device cpu)" >&2
      exit 1
    fi
    if [ "$peer" = 1 ]; then
      echo "note: --device cuda: llama-server is skipped (the one built here is CPU-only)" >&2
      peer=0
    fi ;;
  *) echo "--device must be cpu or cuda, not $device" >&2; exit 2 ;;
esac
start=$SECONDS load_before=$(cut -d' ' -f1-3 /proc/loadavg)
model=models/smollm2-135m-instruct
name=smollm2-135m-instruct
models/fetch.sh
if [ "$device" = cuda ]; then scripts/cuda-tools.sh; fi
if [ "$build" = 1 ] && ! cargo build --release --quiet; then
  echo "warning: cargo build --release failed; benchmarking what target/release holds" >&2
fi
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, httpx, sentencepiece" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi

# llama-server and the f32 GGUF, built once into .bench/llama.cpp/.
gguf=.bench/llama.cpp/$name-f32.gguf
if [ "$peer" = 1 ]; then
  convert=()
  [ -z "$served_gguf" ] && convert=(--f32-gguf)
  bin=$(benches/llama-cpp.sh --version "$llama_py" "${convert[@]}" llama-server)
  server_bin=$bin/llama-server
  src=.bench/llama.cpp/llama_cpp_python-$llama_py/vendor/llama.cpp
  llama_commit=$(git -C "$src" rev-parse --short HEAD 2>/dev/null || echo unknown)
fi

work=$(mktemp -d)
engine_pid='' llama_pid=''
cleanup() {
  for pid in $engine_pid $llama_pid; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

start_server() { # port log command... (sets server_pid)
  local port=$1 log=$2; shift 2
  "$@" > "$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1200); do
    if curl -sf "http://127.0.0.1:$port/health" > /dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server_pid" 2>/dev/null; then
      echo "the server stopped before it was ready: $*" >&2; tail -20 "$log" >&2; exit 1
    fi
    sleep 0.5
  done
  echo "the server was not ready after 10 minutes: $*" >&2; exit 1
}

# Both servers stay up for the whole run, idle while the other is measured,
# and each level runs on both back to back (the order alternating), so that
# what other work on a shared machine does to the speed lands on both alike.
engine_port=$(free_port)
echo "engine serve: $threads threads, device $device" >&2
start_server "$engine_port" "$work/engine.log" target/release/engine --threads "$threads" serve \
  --model "${served_gguf:-$model}" --served-model-name "$name" --port "$engine_port" \
  --device "$device" --max-seqs 64 --kv-cache-mib 1440
engine_pid=$server_pid
if [ "$peer" = 1 ]; then
  llama_port=$(free_port)
  while [ "$llama_port" = "$engine_port" ]; do llama_port=$(free_port); done
  echo "llama-server (llama.cpp $llama_commit): $threads threads" >&2
  start_server "$llama_port" "$work/llama.log" "$server_bin" -m "${served_gguf:-$gguf}" -a "$name" \
    --host 127.0.0.1 --port "$llama_port" -t "$threads" -tb "$threads" -np 64 -c 32768 \
    --cont-batching -ctk f32 -ctv f32 --cache-ram 0 --metrics
  llama_pid=$server_pid
fi

results=$work/results.jsonl
max_tokens=128
[ "$quick" = 1 ] && max_tokens=32
load() { # label port pid concurrency requests first-prompt [--prompt-tokens N]
  local label=$1 port=$2 pid=$3 conc=$4 n=$5 first=$6; shift 6
  .venv/bin/python benches/serve_load.py --base-url "http://127.0.0.1:$port" --model "$name" \
    --tokenizer "$model/tokenizer.json" --label "$label" --pid "$pid" --max-tokens "$max_tokens" \
    --concurrency "$conc" --requests "$n" --first-prompt "$first" "$@" | tee -a "$results"
}
level() { # index concurrency requests first-prompt [--prompt-tokens N]
  local i=$1; shift
  if [ "$peer" = 1 ] && [ $((i % 2)) = 1 ]; then load llama-server "$llama_port" "$llama_pid" "$@"; fi
  load engine "$engine_port" "$engine_pid" "$@"
  if [ "$peer" = 1 ] && [ $((i % 2)) = 0 ]; then load llama-server "$llama_port" "$llama_pid" "$@"; fi
}
# (concurrency, requests): 4 at concurrency 1, else twice the concurrency.
if [ "$quick" = 1 ]; then counts=(1 4 16 64) long_n=16; else counts=(4 8 32 128) long_n=32; fi
first=0 i=0
for c in 1 4 16 64; do
  level "$i" "$c" "${counts[$i]}" "$first"
  first=$((first + counts[i])) i=$((i + 1))
done
# 256-token prompts at concurrency 16: the TTFT target.
level "$i" 16 "$long_n" 100000 --prompt-tokens 256
curl -sf "http://127.0.0.1:$engine_port/metrics" > "$work/engine-metrics.txt" || true
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
.venv/bin/python - "$results" "$work/engine-metrics.txt" "$cpu" "$threads" "$device" \
  "${llama_commit:-}" "$llama_py" "$quick" "$((SECONDS - start))" "$load_before" \
  "$(cut -d' ' -f1-3 /proc/loadavg)" "${served_gguf:-f32}" <<'PY'
import json, sys
path, metrics, cpu, threads, device, commit, llama_py, quick, secs, load0, load1, weights = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
eng = {r["concurrency"]: r for r in rows if r["server"] == "engine" and r["prompt_tokens"] != 256}
peer = {r["concurrency"]: r for r in rows if r["server"] == "llama-server" and r["prompt_tokens"] != 256}
long = {r["server"]: r for r in rows if r["prompt_tokens"] == 256}
out_tok = rows[0]["output_tokens"] // rows[0]["requests"]
print(f"\nSmolLM2-135M-Instruct, {weights}, {threads} threads, device {device}; CPU: {cpu}")
print(f"prompts 32-256 tokens, {out_tok} output tokens each (ignore_eos, temperature 0)"
      + (" -- QUICK smoke run, not the benchmark" if quick == "1" else ""))
if peer:
    print(f"llama-server: llama.cpp {commit} (vendored by llama-cpp-python {llama_py}), "
          "-np 64, continuous batching, f32 GGUF, f32 KV")
print("requests per level: " + ", ".join(f"c={c}: {eng[c]['requests']}" for c in sorted(eng))
      + (f"; 256-token prompts at c=16: {long['engine']['requests']}" if "engine" in long else ""))
print("ratio = engine / llama-server (time rows: lower is better)\n")
cols = f"{'':24}{'engine':>13}{'llama-server':>15}{'ratio':>8}"
print(cols)
def row(label, e, p, fmt):
    pe = fmt.format(p) if p is not None else "-"
    ratio = f"{e / p:>7.2f}x" if p else ""
    print(f"{label:24}{fmt.format(e):>13}{pe:>15}{ratio:>8}")
for c in sorted(eng):
    e, p = eng[c], peer.get(c)
    g = lambda k: p[k] if p else None
    row(f"c={c} output tok/s", e["out_tok_s"], g("out_tok_s"), "{:.1f}")
    row(f"c={c} requests/s", e["req_s"], g("req_s"), "{:.3f}")
    row(f"c={c} TTFT p50 s", e["ttft_p50_s"], g("ttft_p50_s"), "{:.3f}")
    row(f"c={c} TTFT p99 s", e["ttft_p99_s"], g("ttft_p99_s"), "{:.3f}")
    row(f"c={c} TPOT p50 ms", e["tpot_p50_ms"], g("tpot_p50_ms"), "{:.1f}")
    row(f"c={c} TPOT p99 ms", e["tpot_p99_ms"], g("tpot_p99_ms"), "{:.1f}")
if "engine" in long:
    e, p = long["engine"], long.get("llama-server")
    g = lambda k: p[k] if p else None
    n = e["requests"]
    row(f"256-tok c=16 TTFT p50 s", e["ttft_p50_s"], g("ttft_p50_s"), "{:.3f}")
    row(f"256-tok c=16 TTFT p99 s", e["ttft_p99_s"], g("ttft_p99_s"), "{:.3f}")
    if e.get("ttft_later_p99_s") is not None:
        row(f"  after the first 16 p50", e["ttft_later_p50_s"], g("ttft_later_p50_s"), "{:.3f}")
        row(f"  after the first 16 p99", e["ttft_later_p99_s"], g("ttft_later_p99_s"), "{:.3f}")
    row(f"256-tok c=16 out tok/s", e["out_tok_s"], g("out_tok_s"), "{:.1f}")
last = [r for r in rows if r["server"] == "engine"][-1]
lastp = [r for r in rows if r["server"] == "llama-server"]
row("peak RSS MiB", last["peak_rss_mib"] or 0, lastp[-1]["peak_rss_mib"] if lastp else None, "{:.0f}")

print()
scale = lambda d: d[16]["out_tok_s"] / d[1]["out_tok_s"] if 1 in d and 16 in d else float("nan")
print(f"output tok/s, c=16 / c=1: engine {scale(eng):.2f}x" + (f", llama-server {scale(peer):.2f}x" if peer else "")
      + "  (target: engine >= 6x)")
if peer:
    worst = min(eng[c]["out_tok_s"] / peer[c]["out_tok_s"] for c in eng if c in peer)
    print(f"output tok/s, engine / llama-server, lowest over the levels: {worst:.2f}x  (target: >= 1.0x at every level)")
if "engine" in long:
    print(f"TTFT p99 at c=16, 256-token prompts: engine {long['engine']['ttft_p99_s']:.2f} s  (target: < 2 s)")
    print("  (the first 16 requests arrive at once: the last of them waits for all 16 prompts)")
try:
    m = dict(l.rsplit(" ", 1) for l in open(metrics).read().splitlines() if l and not l.startswith("#"))
    print(f"engine /metrics: prefix-cache hit rate {float(m['engine_prefix_cache_hit_rate']):.3f}, "
          f"{m['engine_prompt_tokens_total']} prompt and {m['engine_generation_tokens_total']} generated tokens")
except (OSError, KeyError):
    pass
print(f"load average (1, 5, 15 min) at the start: {load0}; at the end: {load1}")
print(f"benches/serve.sh took {int(secs) // 60} min {int(secs) % 60} s (builds included)")
PY
