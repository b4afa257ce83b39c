"""Pseudo-labels for PLG: each training class named by the top-k names of a classifier.

For every class, the classifier's logits are averaged over the class's images and the k highest
(descending) give the names, as the authors' `relabel` does at the class level. The result is
cached as JSON in the run directory (`pseudolabels.json`, class -> names) to inspect and to reuse
on resume; a cache made with another classifier, vocabulary, k or class list is recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from baton.errors import BatonError
from baton.io import write_json_atomic

CACHE = "pseudolabels.json"


def load_vocabulary(spec: str) -> list[str]:
    """`imagenet`: the 1000 ImageNet-1k class names in class-index order (open_clip's cleaned
    list); otherwise a text file with one name per line (blank lines and #-comments skipped)."""
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    p = Path(spec)
    if not p.is_file():
        raise BatonError(f"language.vocabulary {spec!r} is neither 'imagenet' nor a file of names (one a line)")
    names = [ln.strip() for ln in p.read_text().splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise BatonError(f"language.vocabulary file {p} lists no names")
    return names


def class_topk(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """(C, k) vocabulary indices: the top-k of each class's mean logits, best first."""
    if k > logits.shape[1]:
        raise BatonError(f"language.topk={k} exceeds the vocabulary size {logits.shape[1]}")
    labels = labels.long()
    counts = torch.bincount(labels, minlength=num_classes)
    if (counts == 0).any():
        raise BatonError(f"class {int((counts == 0).nonzero()[0])} has no images to pseudo-label")
    sums = torch.zeros(num_classes, logits.shape[1], dtype=torch.float64).index_add_(0, labels, logits.double())
    return (sums / counts[:, None]).topk(k, dim=1).indices


def pseudolabels(classifier, images: Sequence, labels: Sequence[int], class_names: Sequence[str], k: int,
                 cache_dir: str | Path | None = None, spec: str = "", vocabulary_spec: str = "") -> dict[str, list[str]]:
    """{class name: top-k names}, from the cache in `cache_dir` when it matches, else computed and cached.
    `classifier` may be a zero-argument factory, so a cache hit never builds the model."""
    key = {"classifier": spec, "vocabulary": vocabulary_spec, "topk": k, "classes": list(class_names)}
    cache = Path(cache_dir) / CACHE if cache_dir is not None else None
    if cache is not None and cache.is_file():
        try:
            saved = json.loads(cache.read_text())
            if {k2: saved.get(k2) for k2 in key} == key:
                return {c: list(saved["pseudolabels"][c]) for c in class_names}
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or stale: recompute
    if not hasattr(classifier, "logits"):
        classifier = classifier()
    logits = classifier.logits(list(images))
    top = class_topk(logits, torch.as_tensor(list(labels)), len(class_names), k)
    vocab = classifier.vocabulary
    result = {c: [vocab[int(i)] for i in top[ci]] for ci, c in enumerate(class_names)}
    if cache is not None:
        write_json_atomic(cache, {**key, "pseudolabels": result,
                                  "classifier_description": getattr(classifier, "description", spec)})
    return result
