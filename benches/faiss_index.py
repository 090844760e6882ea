"""faiss's side of the flat inner-product search benchmark (benches/index.sh).

Reads the vectors of the index folder benches/index.rs built (the current
generation's vectors file, rows x dim little-endian f32) and its queries.f32,
puts them in a faiss.IndexFlatIP, and times the same searches as
benches/index.rs: every query alone (single) and in batches of 64, the best of
--repeats passes after a warm-up, by whichever
of faiss's two ways of scoring (its SIMD loops or BLAS) is faster for each. Compares its ids with engine-ids.u32 (the
ids engine found for the single queries) and prints one JSON line.
"""

import argparse
import json
import os
import time

import numpy as np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", required=True)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    a = p.parse_args()

    import faiss

    faiss.omp_set_num_threads(a.threads)
    with open(os.path.join(a.dir, "index.json")) as f:
        manifest = json.load(f)
    dim, rows = manifest["dim"], manifest["rows"]
    path = os.path.join(a.dir, f"vectors-{manifest['generation']}.f32")
    vectors = np.fromfile(path, dtype="<f4", count=rows * dim).reshape(rows, dim)
    queries = np.fromfile(os.path.join(a.dir, "queries.f32"), dtype="<f4").reshape(-1, dim)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    del vectors
    nq, k = len(queries), a.k

    def one_pass(threshold):
        faiss.cvar.distance_compute_blas_threshold = threshold
        t0 = time.perf_counter()
        ids = [index.search(queries[i : i + 1], k)[1][0] for i in range(nq)]
        single = time.perf_counter() - t0
        t1 = time.perf_counter()
        for i in range(0, nq, 64):
            index.search(queries[i : i + 64], k)
        return single, time.perf_counter() - t1, np.concatenate(ids)

    # faiss scores a search either with its own SIMD loops or through BLAS
    # (sgemm), by a size threshold; each timing below is the faster of the
    # two, so engine meets faiss at its best for single queries and batches.
    default = faiss.cvar.distance_compute_blas_threshold
    _, _, ids = one_pass(default)  # warm-up
    single = batched = float("inf")
    paths = {}
    for threshold, path in ((default, "simd"), (1, "blas")):
        for _ in range(a.repeats):
            s, b, _ = one_pass(threshold)
            if s < single:
                single, paths["single"] = s, path
            if b < batched:
                batched, paths["batch64"] = b, path

    ours = np.fromfile(os.path.join(a.dir, "engine-ids.u32"), dtype="<u4").reshape(nq, k)
    theirs = ids.reshape(nq, k)
    same_lists = int(sum((ours[i] == theirs[i]).all() for i in range(nq)))
    print(
        json.dumps(
            {
                "impl": "faiss",
                "version": faiss.__version__,
                "rows": rows,
                "dim": dim,
                "k": k,
                "queries": nq,
                "threads": a.threads,
                "single_qps": round(nq / single),
                "batch64_qps": round(nq / batched),
                "faster_path": paths,
                "same_top_k_as_engine": f"{same_lists}/{nq}",
            }
        )
    )


if __name__ == "__main__":
    main()
