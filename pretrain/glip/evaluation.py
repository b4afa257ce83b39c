"""Held-out monitoring of GLIP: phrase grounding Recall@1 at IoU >= 0.5 (the Flickr30k protocol's R@1)
and zero-shot detection mAP (`pretrain.glip.detection`) on `eval.shards`.

For each region of a held-out scene the model is prompted with the scene's caption; the phrase's
score at a location is the mean alignment probability over the phrase's tokens (GLIP scores a
phrase from its tokens), and the phrase's top-1 box is the box predicted at its best location. A
region counts as found when that box overlaps its annotated box with IoU >= 0.5. Samples are split
over ranks (sample i on rank i mod world) and the counts summed, so every rank gets the same score.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from baton.distributed import all_reduce_sum
from pretrain.data import Rejected, resolve_sources
from pretrain.glip.data import GroundingSample
from pretrain.glip.loss import boxes_of

IOU = 0.5


def top1_boxes(out: dict, positive_map: torch.Tensor) -> torch.Tensor:
    """(B, R, 4): per region, the predicted box at the location where its phrase scores highest."""
    probs = out["logits"].float().sigmoid()                                       # (B, N, L)
    weights = positive_map / positive_map.sum(-1, keepdim=True).clamp(min=1)      # (B, R, L)
    scores = torch.einsum("bnl,brl->brn", probs, weights)
    best = scores.argmax(-1)                                                     # (B, R)
    boxes = boxes_of(out["locations"][None].float(), out["ltrb"].float())        # (B, N, 4)
    return torch.gather(boxes, 1, best[..., None].expand(*best.shape, 4))


def recall_counts(pred: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor) -> tuple[int, int]:
    """(regions found at IoU >= 0.5, regions) of one batch."""
    hits = total = 0
    for p, g, v in zip(pred, boxes, valid.bool()):
        if v.any():
            iou = box_iou(p[v], g[v]).diagonal()
            hits += int((iou >= IOU).sum())
            total += int(v.sum())
    return hits, total


def read_eval_set(method, rank: int, world: int) -> list[tuple[tuple, tuple]]:
    """This rank's share of the first eval.max_samples of `eval.shards`, in shard order: per scene the
    mapped grounding row (image normalised) and its (image, [(phrase, box), ...]) for detection."""
    import webdataset as wds

    sample_map = GroundingSample(method.glip, method.tokenizer())   # uint8 images, normalised here
    norm = sample_map.batch_normalize
    urls = resolve_sources(method.cfg.eval.shards).urls
    limit = method.cfg.eval.max_samples
    scenes = []
    for i, raw in enumerate(wds.WebDataset(urls, shardshuffle=False, empty_check=False)):
        if limit is not None and i >= limit:
            break
        if i % world != rank:
            continue
        try:
            row, (_, objects) = sample_map(raw, 0), sample_map.objects(raw)
        except Rejected:
            continue
        image = norm(row[0][None])[0]
        scenes.append(((image, *row[1:]), (image, objects)))
    return scenes


@torch.no_grad()
def grounding_recall(model, rows: list[tuple], batch_size: int, device) -> dict[str, float]:
    """Recall@1 over this rank's grounding rows, the counts summed over ranks."""
    hits = total = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images, ids, mask, boxes, valid, pmap = (torch.stack(c).to(device) for c in zip(*chunk))
        out = model(images, ids, mask)
        h, t = recall_counts(top1_boxes(out, pmap), boxes, valid)
        hits, total = hits + h, total + t
    counts = all_reduce_sum(torch.tensor([hits, total], dtype=torch.float64, device=device))
    return {"grounding_r1": float(counts[0] / counts[1].clamp(min=1)), "grounding_regions": float(counts[1])}


@torch.no_grad()
def evaluate_glip(model, method, device) -> dict[str, float]:
    """Grounding R@1 and, with glip.detection_classes > 0 (and torchmetrics installed), zero-shot mAP."""
    scenes = read_eval_set(method, method.info.rank, method.info.world_size)
    scores = grounding_recall(model, [g for g, _ in scenes], method.cfg.eval.batch_size, device)
    if method.glip.detection_classes:
        from pretrain.glip.detection import zero_shot_map

        scores.update(zero_shot_map(model, method, [d for _, d in scenes], device))
    return scores
