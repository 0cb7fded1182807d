"""The ANN peer for `bench/ann.sh`: clustered unit vectors, exact ground truth, and faiss's HNSW on them.

    ann.py DIM N Q OUTDIR THREADS  ->  OUTDIR/{base,queries,truth}.npy and one JSON line (faiss's numbers)

Data as in issue #13: 1,000 Gaussian centres (unit normal), points centre + sigma*noise with sigma 0.5,
normalised; queries drawn the same way. faiss: IndexHNSWFlat (inner product), M 32, efConstruction 80,
efSearch 128, single-query latency (one query per call, as a search box sends them).
"""
import json, os, sys, time

import numpy as np
import faiss

dim, n, q, out, threads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
faiss.omp_set_num_threads(threads)
rng = np.random.default_rng(0)
centres = rng.standard_normal((1000, dim)).astype(np.float32)


def draw(count):
    x = np.empty((count, dim), np.float32)
    for s in range(0, count, 100_000):
        e = min(count, s + 100_000)
        x[s:e] = centres[rng.integers(0, 1000, e - s)] + 0.5 * rng.standard_normal((e - s, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


base, queries = draw(n), draw(q)
flat = faiss.IndexFlatIP(dim)
flat.add(base)
t0 = time.perf_counter()
_, truth = flat.search(queries, 10)
flat_ms = (time.perf_counter() - t0) * 1e3 / q
t0 = time.perf_counter()
flat.search(queries[:1], 10)
flat_single_ms = (time.perf_counter() - t0) * 1e3
del flat
np.save(os.path.join(out, "base.npy"), base)
np.save(os.path.join(out, "queries.npy"), queries)
np.save(os.path.join(out, "truth.npy"), truth.astype(np.int64))

index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
index.hnsw.efConstruction = 80
t0 = time.perf_counter()
index.add(base)
build_s = time.perf_counter() - t0
index.hnsw.efSearch = 128
path = os.path.join(out, "faiss.index")
faiss.write_index(index, path)
size_mb = os.path.getsize(path) / 1e6
os.remove(path)
lat, found = [], 0
for i in range(q):
    t0 = time.perf_counter()
    _, ids = index.search(queries[i : i + 1], 10)
    lat.append((time.perf_counter() - t0) * 1e3)
    found += len(set(ids[0]) & set(truth[i]))
lat.sort()
print(json.dumps({
    "engine": f"faiss {faiss.__version__} IndexHNSWFlat", "vectors": n, "dim": dim, "queries": q, "k": 10,
    "M": 32, "ef_construction": 80, "ef_search": 128, "threads": threads,
    "build_s": round(build_s, 1), "index_mb": round(size_mb, 1), "recall_at_k": found / (q * 10),
    "p50_ms": lat[len(lat) // 2], "p99_ms": lat[min(q - 1, round((q - 1) * 0.99))],
    "flat_ms_per_query_batched": flat_ms, "flat_single_query_ms": flat_single_ms,
}))
