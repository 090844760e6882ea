#!/usr/bin/env bash
# Quantized weights: engine next to llama.cpp's llama-bench on the same GGUF
# files and threads, in one run. SmolLM2-135M-Instruct as f32 and bf16 GGUFs
# (llama.cpp's convert_hf_to_gguf.py) and as Q8_0, Q4_0 and Q4_K (Q4_K_M)
# GGUFs (`engine quantize`, whose bytes equal llama-quantize's); for each, at
# 1 and 2 threads (or --threads):
#   decode tok/s: 128 tokens after a 128-token prompt (engine: greedy steps
#     with the KV cache, benches/inference.rs; llama-bench: tg128 @ d128);
#   prefill tok/s: a 512-token prompt (engine: the prompt to its first token;
#     llama-bench: pp512);
#   peak RSS of each process (engine: the decode run; llama-bench: the
#     whole process, both thread counts);
# and the memory-bandwidth bound on decode: the file's bytes (a token reads
# every matrix once; the tied embedding is the LM head) over the read
# bandwidth benches/bandwidth.rs measures on the same threads.
#   benches/quantized.sh [--threads 1,2] [--repeats R] [--types f32,bf16,q8_0,q4_0,q4_k]
#
# The prompt is the 518-token text of tests/fixtures/quant_llama_reference.json
# (prose; llama-bench uses random tokens, which costs the same). llama-bench
# keeps its default f16 KV cache (it takes no f32 one); engine's is f32, which
# is more to read, so the comparison does not favour engine. engine's numbers
# are medians of --repeats runs after a warm-up, llama-bench's means of as many.
# llama.cpp is built by benches/llama-cpp.sh (the llama-cpp-python 0.3.36
# sdist's sources) into the git-ignored .bench/; the GGUFs go to .bench/quant/.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=1,2 repeats=3 types=f32,bf16,q8_0,q4_0,q4_k
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --types) types=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
start=$SECONDS load_before=$(cut -d' ' -f1-3 /proc/loadavg)
models/fetch.sh
cargo build --release --quiet
cargo bench --quiet --no-run --bench inference --bench bandwidth 2>/dev/null
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, transformers, sentencepiece" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi
bin=$(benches/llama-cpp.sh --f32-gguf --bf16-gguf llama-bench)
mkdir -p .bench/quant
file_of() { # type → the GGUF both run
  case "$1" in
    f32|bf16) echo ".bench/llama.cpp/smollm2-135m-instruct-$1.gguf" ;;
    *) echo ".bench/quant/smollm2-135m-instruct-$1.gguf" ;;
  esac
}
IFS=, read -ra type_list <<< "$types"
IFS=, read -ra thread_list <<< "$threads"
for t in "${type_list[@]}"; do
  f=$(file_of "$t")
  case "$t" in
    f32|bf16) ;;
    q8_0|q4_0|q4_k)
      [ -s "$f" ] || target/release/engine quantize --model models/smollm2-135m-instruct \
        --type "$t" --out "$f" >&2 ;;
    *) echo "--types: f32, bf16, q8_0, q4_0 or q4_k, not $t" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work" <<'PY'
import json, sys
ref = json.load(open("tests/fixtures/quant_llama_reference.json"))
ids = max((c["token_ids"] for c in ref["types"]["q8_0"]), key=len)
assert len(ids) >= 512, len(ids)
for n in (128, 512):
    json.dump(ids[:n], open(f"{sys.argv[1]}/ids{n}.json", "w"))
PY
results=$work/results.jsonl
for t in "${type_list[@]}"; do
  f=$(file_of "$t")
  for th in "${thread_list[@]}"; do
    echo "engine, $t, $th threads" >&2
    decode=$(cargo bench --quiet --bench inference -- --model "$f" --prompt-ids "$work/ids128.json" \
      --decode-tokens 128 --threads "$th" --repeats "$repeats")
    prefill=$(cargo bench --quiet --bench inference -- --model "$f" --prompt-ids "$work/ids512.json" \
      --decode-tokens 1 --threads "$th" --repeats "$repeats")
    bw=$(cargo bench --quiet --bench bandwidth -- --threads "$th")
    echo "{\"impl\": \"engine\", \"type\": \"$t\", \"threads\": $th, \"decode\": $decode, \"prefill\": $prefill, \"bandwidth\": $bw}" >> "$results"
  done
  echo "llama-bench, $t, threads $threads" >&2
  # Peak RSS of the child, from the kernel's accounting.
  python3 - "$bin/llama-bench" "$f" "$threads" "$repeats" "$t" >> "$results" <<'PY'
import json, resource, subprocess, sys
exe, model, threads, repeats, ty = sys.argv[1:]
rows = []
for args in (["-p", "512", "-n", "0"], ["-p", "0", "-n", "128", "-d", "128"]):
    out = subprocess.run([exe, "-m", model, "-t", threads, "-r", repeats, "-o", "jsonl", *args],
                         check=True, capture_output=True, text=True).stdout
    rows += [json.loads(l) for l in out.splitlines() if l.startswith("{")]
rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
for th in sorted({r["n_threads"] for r in rows}):
    pick = lambda test: next(r["avg_ts"] for r in rows if r["n_threads"] == th and test(r))
    print(json.dumps({"impl": "llama.cpp", "type": ty, "threads": th,
                      "prefill_tok_s": pick(lambda r: r["n_prompt"] == 512),
                      "decode_tok_s": pick(lambda r: r["n_gen"] == 128),
                      "peak_rss_mb": rss_mb, "build_commit": rows[0]["build_commit"]}))
PY
done
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
python3 - "$results" "$cpu" "$((SECONDS - start))" "$load_before" "$(cut -d' ' -f1-3 /proc/loadavg)" \
  "${type_list[@]}" <<'PY'
import json, os, sys
path, cpu, secs, load0, load1, *types = sys.argv[1:]
rows = [json.loads(l) for l in open(path)]
eng = {(r["type"], r["threads"]): r for r in rows if r["impl"] == "engine"}
peer = {(r["type"], r["threads"]): r for r in rows if r["impl"] == "llama.cpp"}
def file_of(t):
    return f".bench/llama.cpp/smollm2-135m-instruct-{t}.gguf" if t in ("f32", "bf16") \
        else f".bench/quant/smollm2-135m-instruct-{t}.gguf"
commit = next(iter(peer.values()))["build_commit"]
print(f"\nSmolLM2-135M-Instruct, the same GGUF for both; CPU: {cpu}; llama.cpp {commit}")
print("decode: 128 tokens after 128; prefill: 512 tokens; tok/s; bound: file bytes / read bandwidth")
print("| weights | file MiB | threads | decode engine | llama.cpp | ratio | bound | "
      "prefill engine | llama.cpp | ratio | peak RSS engine MiB | llama.cpp | engine RSS / file |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for t in types:
    size = os.path.getsize(file_of(t))
    for (ty, th), e in sorted(eng.items(), key=lambda kv: kv[0][1]):
        if ty != t:
            continue
        p = peer[(t, th)]
        d, pf = e["decode"]["decode_tok_s"], e["prefill"]["prefill_tok_s"]
        bound = e["bandwidth"]["read_gb_s"] * 1e9 / size
        rss = max(e["decode"]["peak_rss_mb"], e["prefill"]["peak_rss_mb"])
        print(f"| {t} | {size / 2**20:.1f} | {th} | {d:.1f} | {p['decode_tok_s']:.1f} | "
              f"{d / p['decode_tok_s']:.2f}x | {bound:.0f} | {pf:.1f} | {p['prefill_tok_s']:.1f} | "
              f"{pf / p['prefill_tok_s']:.2f}x | {rss:.0f} | {p['peak_rss_mb']:.0f} | "
              f"{rss * 2**20 / size:.2f} |")
for th in sorted({th for _, th in eng}):
    if ("q4_0", th) in eng and ("f32", th) in eng:
        q, f = (eng[(t, th)]["decode"]["decode_tok_s"] for t in ("q4_0", "f32"))
        print(f"Q4_0 decode / f32 decode (engine, {th} threads): {q / f:.2f}x")
bw = {th: e["bandwidth"]["read_gb_s"] for (_, th), e in eng.items()}
print(f"read bandwidth GB/s by threads: {bw}")
print(f"{secs} s; load average before {load0}, after {load1}")
PY
