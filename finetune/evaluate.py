"""Retrieval metrics on held-out classes, with the conventions of "A Metric Learning Reality
Check" (Musgrave et al., 2020) and pytorch-metric-learning's AccuracyCalculator, so numbers are
comparable with published DML results.

Every embedding is a query against all the others (the query itself excluded). Exact inner-product
search (faiss IndexFlatIP) on L2-normalised embeddings, i.e. cosine similarity. A query whose class
has no other member cannot be answered and is left out of Recall@k and MAP@R (as pml does).
NMI clusters all embeddings with faiss k-means, k = number of classes, with pml's settings
(niter=20, faiss's default seed), so it is reproducible and equal to pml's.
"""

from __future__ import annotations

import numpy as np
import torch

from baton.errors import BatonError
from baton.extras import require

RECALL_KS = (1, 2, 4, 8)
KMEANS_NITER = 20
KMEANS_SEED = 1234  # faiss.Kmeans' default, which pml relies on


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_excluding_self(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (N, k): the k nearest other items of every row of x.

    Searches k+1 and removes the row itself; if ties push the row out of its own top k+1, the last
    neighbour is dropped instead, so every row keeps exactly k.
    """
    faiss = require("faiss", "nearest-neighbour search")
    n, d = x.shape
    index = faiss.IndexFlatIP(d)
    index.add(x)
    sims, idx = index.search(x, min(k + 1, n))
    is_self = idx == np.arange(n)[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    keep = ~is_self
    return sims[keep].reshape(n, -1), idx[keep].reshape(n, -1)


def kmeans_labels(x: np.ndarray, n_clusters: int) -> np.ndarray:
    faiss = require("faiss", "k-means clustering (NMI)")
    # min_points_per_centroid only decides whether faiss prints "please provide at least N training
    # points" (k = the number of held-out classes always asks for more); the clustering is the same.
    km = faiss.Kmeans(x.shape[1], n_clusters, niter=KMEANS_NITER, seed=KMEANS_SEED, verbose=False,
                      min_points_per_centroid=1)
    km.train(x)
    _, assign = km.index.search(x, 1)
    return assign[:, 0]


def retrieval_metrics(embeddings, labels) -> dict[str, float]:
    """Recall@1/2/4/8, MAP@R and NMI of `embeddings` (N, D) with integer `labels` (N,).

    Recall@k: fraction of queries with at least one same-class item among their k nearest.
    MAP@R: with R = the number of other items of the query's class, the mean over the R nearest of
    precision@i at each correct position i, divided by R (so it rewards ranking *all* of the class
    first, which Recall@k does not).
    """
    from sklearn.metrics import normalized_mutual_info_score

    x = l2_normalize(_as_numpy(embeddings))
    y = _as_numpy(labels).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {x.shape} and {y.shape}")
    n = len(y)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1  # other items of each query's class
    answerable = r > 0
    out: dict[str, float] = {}
    k = int(min(n - 1, max(max(RECALL_KS), r.max(initial=0))))
    if answerable.any() and k > 0:
        _, idx = knn_excluding_self(x, k)
        hit = (y[idx] == y[:, None])[answerable]  # (Q, k)
        for kk in RECALL_KS:
            out[f"recall@{kk}"] = float(hit[:, :kk].any(axis=1).mean())
        rq = r[answerable]
        ranks = np.arange(1, hit.shape[1] + 1)
        within_r = ranks[None, :] <= rq[:, None]
        rel = hit & within_r
        prec = np.cumsum(rel, axis=1) / ranks[None, :]
        out["map@r"] = float(((prec * rel).sum(axis=1) / rq).mean())
    else:
        out.update({f"recall@{kk}": float("nan") for kk in RECALL_KS})
        out["map@r"] = float("nan")
    n_classes = len(counts)
    if 1 < n_classes <= n:
        out["nmi"] = float(normalized_mutual_info_score(y, kmeans_labels(x, n_classes)))
    else:
        out["nmi"] = float("nan")
    return out


def n_answerable(labels) -> int:
    """How many queries the metrics average over (items whose class has another member)."""
    y = _as_numpy(labels).reshape(-1)
    _, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return int((counts[inverse] > 1).sum())


def require_answerable(labels, what: str) -> int:
    """`n_answerable(labels)`, refusing a split where it is 0: every class has one image, so no
    query has a right answer and every retrieval metric would be NaN (not a result)."""
    n = n_answerable(labels)
    if n == 0:
        y = _as_numpy(labels).reshape(-1)
        raise BatonError(f"{what}: {len(y)} images of {len(np.unique(y))} classes, none with a second image, "
                         f"so no query has an answer and Recall@k / MAP@R are undefined; evaluate on a split "
                         f"with at least two images of some classes")
    return n
