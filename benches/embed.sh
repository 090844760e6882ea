#!/usr/bin/env bash
# CPU embedding benchmark: engine's Embedder next to sentence-transformers,
# all-MiniLM-L6-v2 in f32, the same texts, batch size and threads, in one run.
# sentence-transformers is installed into the git-ignored .venv from
# benches/requirements.txt.
#   benches/embed.sh [--set queries|passages|both] [--queries N] [--passages N]
#                    [--batch B] [--threads T] [--repeats R]
#
# The texts come from this repository's prose (benches/embed_st.py
# --make-texts): "queries", N short texts (the sentences of README.md and
# examples/quillmark-kb, the knowledge base's questions, and fragments of them;
# default 1024), and "passages", N runs of 60-150 consecutive words of the same
# prose (about 90-256 tokens; default 256). Each side embeds every text of a
# set in one call (tokenization, length sorting, padding to the batch's
# longest, forward, mean pooling, L2 norm: everything but process start and
# model load), once on 64 texts as a warm-up and then R times (default 3);
# sentences/s is from the median call (the best one is printed too). The
# script then checks that the two sides' embeddings agree (cosine >= 0.9999
# for every text) so that both measure the same thing.
set -euo pipefail
cd "$(dirname "$0")/.."
set_name=both queries=1024 passages=256 batch=32 threads=$(nproc) repeats=3
while [ $# -gt 0 ]; do
  case "$1" in
    --set) set_name=$2; shift 2 ;;
    --queries) queries=$2; shift 2 ;;
    --passages) passages=$2; shift 2 ;;
    --batch) batch=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$set_name" in
  both) sets=(queries passages) ;;
  queries | passages) sets=("$set_name") ;;
  *) echo "--set must be queries, passages or both, not $set_name" >&2; exit 2 ;;
esac
model=models/all-minilm-l6-v2
models/fetch.sh
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import torch, sentence_transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet -r benches/requirements.txt
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python benches/embed_st.py --make-texts "$work" --queries "$queries" --passages "$passages" >/dev/null
# Build first, so that compiling does not overlap the Python side's timing.
cargo bench --quiet --bench embed --no-run

common=(--model "$model" --batch "$batch" --threads "$threads" --repeats "$repeats")
results=()
for s in "${sets[@]}"; do
  st_json=$(OMP_NUM_THREADS=$threads .venv/bin/python benches/embed_st.py --texts "$work/$s.json" \
    --dump "$work/$s.st.f32" "${common[@]}")
  engine_json=$(RAYON_NUM_THREADS=$threads cargo bench --quiet --bench embed -- --texts "$work/$s.json" \
    --dump "$work/$s.engine.f32" "${common[@]}")
  echo "$st_json"
  echo "$engine_json"
  results+=("$s" "$st_json" "$engine_json")
done

.venv/bin/python - "$work" "$(lscpu | sed -n 's/^Model name: *//p' | head -1)" "${results[@]}" <<'PY'
import json, sys
import numpy as np
work, cpu, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
rows, worst = [], {}
for i in range(0, len(rest), 3):
    name, st, en = rest[i], json.loads(rest[i + 1]), json.loads(rest[i + 2])
    a = np.fromfile(f"{work}/{name}.st.f32", dtype="<f4").reshape(st["sentences"], -1).astype(np.float64)
    b = np.fromfile(f"{work}/{name}.engine.f32", dtype="<f4").reshape(en["sentences"], -1).astype(np.float64)
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    worst[name] = float(cos.min())
    rows.append((name, st, en))
st0 = rows[0][1]
print(f"\nall-MiniLM-L6-v2, f32, batch {st0['batch']}, {st0['threads']} threads, {cpu}; "
      f"torch {st0['torch']}, sentence-transformers {st0['sentence_transformers']}")
print(f"{'':34}{'engine':>10}{'s-t':>10}{'ratio':>8}")
for name, st, en in rows:
    label = f"{name} ({st['sentences']}, {st['tokens'] / st['sentences']:.0f} tok avg)"
    e, t = en["sentences_per_s"], st["sentences_per_s"]
    print(f"{label + ' sent/s':34}{e:>10.1f}{t:>10.1f}{e / t:>7.2f}x")
    e, t = en["best_sentences_per_s"], st["best_sentences_per_s"]
    print(f"{'  best of ' + str(len(st['seconds'])):34}{e:>10.1f}{t:>10.1f}{e / t:>7.2f}x")
for name, c in worst.items():
    print(f"{name}: worst cosine engine vs sentence-transformers 1 - {1 - c:.1e}")
bad = [n for n, c in worst.items() if not c >= 0.9999]
if bad:
    sys.exit(f"embeddings disagree (cosine < 0.9999) on: {', '.join(bad)}")
PY
