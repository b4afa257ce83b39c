"""`baton evaluate MODEL --data-source shards --data-root data/emoji --out DIR [--split test]`

Embeds a split (by default the held-out test classes) with MODEL and writes DIR/metrics.json
(`finetune.evaluate.retrieval_metrics` + n_queries, n_classes, model) and DIR/retrieval_grid.png.
MODEL is one of: a finetune run directory or its `model/`; a backbone handoff directory (its
features, no head); `random --like HANDOFF_DIR` (same architecture, seeded random init); `pixels`
(16x16 raw pixels). The last three are the baselines the demo report compares against.

A GLIP pretrain run (or a GLIP export with --shards) is scored on grounding shards instead:
phrase-grounding Recall@1/@5 and zero-shot detection mAP, in `pretrain/glip/evaluate_run.py`; each
side refuses the other's flags by name.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from baton.extras import require
from baton.io import atomic_path, output_dir, write_json_atomic
from baton.logs import setup_logging
from baton.run import choose_device
from finetune.config import MAX_SKIPPED_FRACTION
from finetune.datasets import DATASETS, load_dataset
from finetune.evaluate import knn_excluding_self, l2_normalize, require_answerable, retrieval_metrics
from finetune.model import embed_images, resolve_embedder
from pretrain.glip.evaluate_run import (add_glip_arguments, given_flags, glip_checkpoint, positive_int,
                                        refuse_glip_flags, run_glip)


def retrieval_grid(images, labels: np.ndarray, names: list[str], emb: np.ndarray, out: Path,
                   n_queries: int = 6, k: int = 5, seed: int = 0) -> Path:
    """A fixed (seeded) set of queries, one per row, with their top-k neighbours; a neighbour of
    the query's class is framed green, any other red. Queries whose class has no other member are
    not chosen (they could only be wrong)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    candidates = np.flatnonzero(counts[inverse] > 1)
    if len(candidates) == 0:
        candidates = np.arange(len(labels))
    rng = np.random.default_rng(seed)
    chosen: dict[int, int] = {}  # one query per class while classes last, so rows differ
    for i in rng.permutation(candidates):
        chosen.setdefault(int(labels[i]), int(i))
    picks = list(chosen.values())[:n_queries]
    picks += [int(i) for i in rng.permutation(candidates) if int(i) not in picks][:n_queries - len(picks)]
    queries = np.sort(np.array(picks))
    k = min(k, len(labels) - 1)
    _, idx = knn_excluding_self(l2_normalize(emb), k)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.8 * len(queries)), squeeze=False)
    for r, q in enumerate(queries):
        cells = [(q, "query", "black")] + [(j, "", "green" if labels[j] == labels[q] else "red")
                                          for j in idx[q]]
        for c, (j, title, colour) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(np.asarray(images[j]))
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_edgecolor(colour)
                s.set_linewidth(4 if c else 1)
            ax.set_title((title + ": " if title else "") + names[j][:18], fontsize=7, color=colour)
    fig.suptitle("query (left) and its nearest neighbours: green = same class, red = other", fontsize=9)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return out


def _fraction(text: str) -> float:
    """A number in [0, 1], as `data.max_skipped_fraction` takes in finetuning's config."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], not {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="baton evaluate", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("model", help="finetune run dir | its model/ | handoff dir | random | pixels | glip pretrain run")
    p.add_argument("--like", help="with MODEL=random: the handoff whose architecture to initialise")
    p.add_argument("--seed", type=int, default=0, help="random init seed and the folder split seed")
    p.add_argument("--data-source", default="shards", choices=DATASETS)
    p.add_argument("--data-root", help="the dataset's root (required, except for a GLIP run)")
    p.add_argument("--split", default="test", choices=("train", "test"))
    p.add_argument("--max-skipped-fraction", type=_fraction, default=MAX_SKIPPED_FRACTION,
                   help="shards (and GLIP's): the share of bad or lost samples skipped (and counted) before failing")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per forward (default 128; GLIP: the run's glip.eval.batch_size)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-grid", action="store_true", help="skip retrieval_grid.png")
    p.add_argument("--save-embeddings", action="store_true", help="also write embeddings.npy")
    add_glip_arguments(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    given = given_flags(argv, p)
    output_dir(args.out, "--out", create=False)   # before any work: never a traceback after it
    step_dir = glip_checkpoint(args.model, grounding="--shards" in given)
    if step_dir is not None:
        return run_glip(args, given, step_dir)
    refuse_glip_flags(given, args.model)
    if not args.data_root:
        p.error("--data-root is required (for a model other than a GLIP run)")
    args.batch_size = args.batch_size or 128
    log = setup_logging()

    require("faiss", "baton evaluate")  # before any work, not after embedding the split
    embedder = resolve_embedder(args.model, like=args.like, seed=args.seed)  # fail fast on a bad MODEL
    items = load_dataset(args.data_source, args.data_root, args.seed, args.max_skipped_fraction).get(args.split)
    device = choose_device(args.device)   # the rule of train.device
    images = [im for im, _, _ in items]
    labels = np.array([y for _, y, _ in items])
    names = [n for _, _, n in items]
    log.info("evaluate %s on %d %s images of %d classes", embedder.description, len(items), args.split,
             labels.max() + 1)
    n_queries = require_answerable(labels, f"{args.data_root} ({args.split} split)")
    emb = embed_images(embedder.model.to(device), embedder.transform, images, args.batch_size, device,
                       desc=f"embed {args.split}")
    metrics = retrieval_metrics(emb, labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**metrics, "n_queries": n_queries, "n_images": len(items),
              "n_classes": int(labels.max() + 1), "split": args.split, "data_root": str(args.data_root),
              "model": embedder.description, "model_spec": args.model}
    if args.save_embeddings:
        with atomic_path(out / "embeddings.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, emb)
    if not args.no_grid:
        retrieval_grid(images, labels, names, emb, out / "retrieval_grid.png", seed=args.seed)
    write_json_atomic(out / "metrics.json", result)
    print(json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    return 0
