"""Paired comparison of ablation rows: mean-recall differences against a reference row with a bootstrap
interval over the test images, every row scored on the same draws (so what the rows share, the test
sample, cancels out of the difference).

    ablation_paired.py REF_DIR ROW_DIR...   (each DIR from `pirclip eval --embeddings-out DIR`)
    ablation_paired.py --pool REF_DIR:ROW_DIR...   one row over several training seeds: the mean of the
        per-seed differences, every seed scored on the same draws (the test split is the same), so the
        interval covers the test sample while averaging over the seeds' training noise

Ranks follow pirclip eval / the official retrieval.py: a text query's rank is the number of images scoring
strictly higher than its own; an image's, the number of texts scoring strictly higher than its best caption.
"""
import json, os, sys

import numpy as np

KS = (1, 5, 10)
DRAWS = 1000


def per_image_hits(d):
    img, txt = np.load(f"{d}/img_emb.npy"), np.load(f"{d}/text_emb.npy")
    t2i = np.load(f"{d}/text_to_image.npy").astype(np.int64)
    s = txt @ img.T
    n_t, n_i = s.shape
    r_t2i = (s > s[np.arange(n_t), t2i][:, None]).sum(1)
    best = np.full(n_i, -np.inf, dtype=s.dtype)
    np.maximum.at(best, t2i, s[np.arange(n_t), t2i])
    r_i2t = (s.T > best[:, None]).sum(1)
    i2t = np.stack([(r_i2t < k) for k in KS], 1).astype(np.float64)           # [I, K]
    t2i_hits = np.zeros((n_i, len(KS)))
    for j, k in enumerate(KS):
        np.add.at(t2i_hits[:, j], t2i, (r_t2i < k).astype(np.float64))
    captions = np.bincount(t2i, minlength=n_i).astype(np.float64)
    return i2t, t2i_hits, captions


def mean_recall(h, idx):
    i2t, t2i_hits, captions = h
    a = i2t[idx].mean(-2)                                                      # [..., K]
    b = t2i_hits[idx].sum(-2) / captions[idx].sum(-1)[..., None]
    return 100 * (a.sum(-1) + b.sum(-1)) / (2 * len(KS))


if sys.argv[1] == "--pool":
    pairs = [a.split(":") for a in sys.argv[2:]]
    hits = [(per_image_hits(r), per_image_hits(w)) for r, w in pairs]
    n = len(hits[0][0][2])
    draws = np.random.default_rng(0).integers(0, n, size=(DRAWS, n))
    all_idx = np.arange(n)
    diff = np.mean([mean_recall(w, draws) - mean_recall(r, draws) for r, w in hits], axis=0)
    point = np.mean([mean_recall(w, all_idx) - mean_recall(r, all_idx) for r, w in hits])
    lo, hi = np.percentile(diff, [2.5, 97.5])
    print(json.dumps({"rows": [os.path.basename(w.rstrip("/")) for _, w in pairs],
                      "references": [os.path.basename(r.rstrip("/")) for r, _ in pairs],
                      "seeds": len(pairs), "mean_difference": round(float(point), 2),
                      "difference_ci95": [round(float(lo), 2), round(float(hi), 2)],
                      "p_not_better": float((diff <= 0).mean())}))
    sys.exit(0)

ref, rows = sys.argv[1], sys.argv[2:]
h_ref = per_image_hits(ref)
n = len(h_ref[2])
draws = np.random.default_rng(0).integers(0, n, size=(DRAWS, n))
all_idx = np.arange(n)
base_draws = mean_recall(h_ref, draws)
for d in rows:
    h = per_image_hits(d)
    diff = mean_recall(h, draws) - base_draws
    lo, hi = np.percentile(diff, [2.5, 97.5])
    print(json.dumps({"row": os.path.basename(d.rstrip("/")), "reference": os.path.basename(ref.rstrip("/")),
                      "mean_recall": round(float(mean_recall(h, all_idx)), 2),
                      "difference": round(float(mean_recall(h, all_idx) - mean_recall(h_ref, all_idx)), 2),
                      "difference_ci95": [round(float(lo), 2), round(float(hi), 2)],
                      "p_not_better": float((diff <= 0).mean())}))
