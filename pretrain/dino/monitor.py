"""The k-NN monitor of a DINO run: weighted k-NN top-1/top-5 of the TEACHER backbone on held-out labelled shards.

The reference (eval_knn.py) classifies ImageNet val with ImageNet train as the memory. The demo's
held-out set has classes never seen in training and no train split of them, so the set is split in
two by class: within each class, in shard order, samples 0, 2, 4, ... form the memory (the k-NN
"training" set) and 1, 3, 5, ... the queries. A class with one sample only adds a distractor to the
memory. The split depends on the shards and `dino.knn_max_samples` only, never on the world size.

Distributed: the held-out set is numbered identically on every rank (`pretrain.data.labelled`);
rank r decodes and embeds samples r, r+W, ... and the features are summed into one N x D tensor over
ranks (every row is owned by exactly one rank, the others add zeros), so every rank then scores the
same numbers. Every rank runs the same number of forward passes (a rank with fewer samples pads with
a dummy batch), since under FSDP2 a forward is a collective. An undecodable image is left out on
every rank (its validity flag is summed over ranks too) and counted in `knn_skipped`.
"""

from __future__ import annotations

import math
from collections import defaultdict
import torch
import torchvision.transforms as T
from torch import nn

from baton.distributed import DistInfo, all_reduce
from baton.errors import BatonError
from pretrain.data.labelled import LabelledSet, read_labelled
from pretrain.data.samples import Rejected, decode_image
from pretrain.dino.config import DinoConfig
from pretrain.dino.knn import weighted_knn


def eval_transform(cfg: DinoConfig) -> T.Compose:
    """The reference's k-NN preprocessing (resize, centre crop), at the global crop size."""
    size = int(cfg.global_crop_size)
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])


def memory_query_split(labels: list[str]) -> tuple[list[int], list[int]]:
    """(memory indices, query indices): within each class, in order, even positions are memory and odd
    positions queries."""
    seen: dict[str, int] = defaultdict(int)
    memory, query = [], []
    for i, label in enumerate(labels):
        (memory if seen[label] % 2 == 0 else query).append(i)
        seen[label] += 1
    return memory, query


class KnnMonitor:
    """Reads the held-out set once (lazily), then `__call__(backbone)` -> {"knn_top1", "knn_top5", ...}."""

    def __init__(self, cfg: DinoConfig, info: DistInfo, max_skipped_fraction: float | None = None):
        if cfg.knn_shards is None:
            raise BatonError("dino.knn_shards is not set: nothing to monitor")
        if cfg.knn_batch_size < 1:
            raise BatonError(f"dino.knn_batch_size must be >= 1, got {cfg.knn_batch_size}")
        self.cfg, self.info = cfg, info
        self.max_skipped_fraction = cfg.knn_max_skipped_fraction if max_skipped_fraction is None else max_skipped_fraction
        self.transform = eval_transform(cfg)
        self._set: LabelledSet | None = None

    def labelled(self) -> LabelledSet:
        if self._set is None:
            self._set = read_labelled(self.cfg.knn_shards, self.cfg.knn_max_samples, rank=self.info.rank,
                                      world_size=self.info.world_size, key="dino.knn_shards")
            _, query = memory_query_split([s.label for s in self._set.samples])
            if not query:
                raise BatonError(f"dino.knn_shards={self.cfg.knn_shards!r}: no class has two samples among the "
                                 f"{len(self._set.samples)} read (dino.knn_max_samples={self.cfg.knn_max_samples}), "
                                 f"so there is no query; point it at a labelled set with repeated classes")
        return self._set

    @torch.no_grad()
    def features(self, backbone: nn.Module, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(N x D features, N validity flags) of every held-out sample, identical on every rank."""
        samples = self.labelled().samples
        owned = [s for s in samples if s.image is not None]
        images, rows = [], []
        for s in owned:
            try:
                images.append(self.transform(decode_image(s.image)))
                rows.append(s.index)
            except Rejected:
                pass
        size = int(self.cfg.global_crop_size)
        bs = int(self.cfg.knn_batch_size)
        per_rank = math.ceil(len(samples) / self.info.world_size)  # the most samples any rank owns
        n_batches = max(1, math.ceil(per_rank / bs))
        chunks: list[torch.Tensor] = []
        was_training = backbone.training
        backbone.eval()  # BatchNorm: running statistics; no dropout / stochastic depth
        try:
            for b in range(n_batches):
                part = images[b * bs:(b + 1) * bs]
                x = torch.stack(part) if part else torch.zeros(1, 3, size, size)  # dummy: same number of forwards
                out = backbone(x.to(device))
                out = out[0] if isinstance(out, (tuple, list)) else out
                if part:
                    chunks.append(out.float())
        finally:
            backbone.train(was_training)
        width = torch.tensor([int(chunks[0].shape[1]) if chunks else 0], device=device)
        all_reduce(width, "max")  # a rank without a valid sample learns it from the others
        dim = int(width)
        feats = torch.zeros(len(samples), dim, device=device)
        valid = torch.zeros(len(samples), device=device)
        if chunks:
            idx = torch.tensor(rows, device=device)
            feats[idx] = torch.cat(chunks)
            valid[idx] = 1.0
        return all_reduce(feats, "sum"), all_reduce(valid, "sum") > 0

    def __call__(self, backbone: nn.Module, device: torch.device) -> dict[str, float]:
        labelled = self.labelled()
        feats, valid = self.features(backbone, device)
        names = [s.label for s in labelled.samples]
        keep = [i for i in range(len(names)) if bool(valid[i])]
        labelled.check_skipped(self.max_skipped_fraction, f"dino.knn_shards={self.cfg.knn_shards!r}",
                               "dino.knn_max_skipped_fraction", bad_images=len(names) - len(keep))
        memory, query = memory_query_split([names[i] for i in keep])
        if not query or not memory:
            return {"knn_samples": float(len(keep)), "knn_skipped": float(len(names) - len(keep))}
        classes = {c: j for j, c in enumerate(sorted(set(names)))}
        labels = torch.tensor([classes[names[i]] for i in keep], device=feats.device)
        kept = feats[torch.tensor(keep, device=feats.device)]
        m, q = torch.tensor(memory, device=feats.device), torch.tensor(query, device=feats.device)
        top1, top5 = weighted_knn(kept[m], labels[m], kept[q], labels[q], k=self.cfg.knn_k,
                                  temperature=self.cfg.knn_temperature, num_classes=len(classes))
        skipped = len(names) - len(keep) + sum(labelled.skipped.values())
        return {"knn_top1": top1, "knn_top5": top5, "knn_queries": float(len(query)),
                "knn_skipped": float(skipped)}


def knn_monitor(cfg: DinoConfig, info: DistInfo, max_skipped_fraction: float | None = None) -> KnnMonitor | None:
    """The monitor of a run, or None when `dino.knn_shards` is not set. More than
    `max_skipped_fraction` (default `dino.knn_max_skipped_fraction`) of the held-out samples skipped or lost is
    an error naming the shards."""
    return None if cfg.knn_shards is None else KnnMonitor(cfg, info, max_skipped_fraction)
