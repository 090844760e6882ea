#!/usr/bin/env bash
# Flat inner-product search benchmark: engine's index next to faiss-cpu's
# IndexFlatIP on the same random unit vectors (dim 384, as MiniLM's), the
# same queries, k and threads, in one run: queries/s for single queries and
# for batches of 64, at 100k and 1M rows. faiss-cpu is installed into the
# git-ignored .venv. The index folders are kept in target/bench-index/ (1M ×
# 384 is 1.5 GB) so a second run skips building them.
#   benches/index.sh [--rows "100000 1000000"] [--queries Q] [--k K]
#                    [--threads T] [--repeats R] [--no-build]
set -euo pipefail
cd "$(dirname "$0")/.."
rows_list="100000 1000000" queries= k=10 threads=$(nproc) repeats=3 build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --rows) rows_list=$2; shift 2 ;;
    --queries) queries=$2; shift 2 ;;
    --k) k=$2; shift 2 ;;
    --threads) threads=$2; shift 2 ;;
    --repeats) repeats=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
faiss_version=1.15.1
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
if ! .venv/bin/python -c "import faiss, numpy; assert faiss.__version__ == '$faiss_version'" 2>/dev/null; then
  .venv/bin/pip install --quiet "faiss-cpu==$faiss_version" numpy
fi
if [ "$build" = 1 ]; then cargo build --release --quiet --bench index; fi
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; threads $threads"
for rows in $rows_list; do
  dir=target/bench-index/$rows
  # 256 queries, 64 at 1M rows (faiss takes ~0.15 s per single query there).
  nq=${queries:-$([ "$rows" -gt 200000 ] && echo 64 || echo 256)}
  mkdir -p "$dir"
  engine=$(cargo bench --quiet --bench index -- --dir "$dir" --rows "$rows" --dim 384 \
    --queries "$nq" --k "$k" --repeats "$repeats" --threads "$threads")
  faiss=$(OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads .venv/bin/python benches/faiss_index.py --dir "$dir" \
    --k "$k" --repeats "$repeats" --threads "$threads")
  echo "$engine"
  echo "$faiss"
  .venv/bin/python - "$engine" "$faiss" <<'EOF'
import json, sys
e, f = (json.loads(s) for s in sys.argv[1:3])
print(f"rows {e['rows']}: single {e['single_qps']} vs {f['single_qps']} q/s "
      f"({e['single_qps'] / f['single_qps']:.2f}x), batch 64 {e['batch64_qps']} vs "
      f"{f['batch64_qps']} q/s ({e['batch64_qps'] / f['batch64_qps']:.2f}x); "
      f"same top-{e['k']}: {f['same_top_k_as_engine']}")
EOF
done
