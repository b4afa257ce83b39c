"""Held-out monitoring of GLIP: phrase grounding Recall@1 and Recall@5 at IoU >= 0.5 (the Flickr30k
protocol's R@k) and zero-shot detection mAP (`pretrain.glip.detection`) on `glip.eval.shards`.

For each region of a held-out scene the model is prompted with the scene's caption; the phrase's
score at a location is the mean alignment probability over the phrase's tokens (GLIP scores a
phrase from its tokens). The phrase's ranked boxes are the boxes predicted at its locations,
best score first, after NMS at `glip.nms_iou` (as GLIP's post-processor does before the Flickr30k
evaluator ranks them: without it the top 5 of a dense head are five copies of one box). A region
counts as found at k when one of its top-k boxes overlaps its annotated box with IoU >= 0.5; the
top-1 box is the one at the best location (NMS keeps the best box first). Samples are split over
ranks (sample i on rank i mod world) and the counts summed, so every rank gets the same score.

The scenes are read by the project's shared shard reader (`pretrain.data.labelled`), as CLIP's and
DINO's held-out sets are: the same order and rank split, and its rule for bad input (a corrupt scene
is skipped and counted, naming its shard; past `glip.eval.max_skipped_fraction` the evaluation stops).
"""

from __future__ import annotations

import torch
from torchvision.ops import box_iou, nms

from baton.distributed import all_reduce
from pretrain.data import Rejected
from pretrain.data.labelled import LabelledSet, read_labelled
from pretrain.glip.data import GroundingSample
from pretrain.glip.loss import boxes_of

IOU = 0.5
RECALL_AT = (1, 5)


def phrase_scores(out: dict, positive_map: torch.Tensor) -> torch.Tensor:
    """(B, R, N): per region, its phrase's score at every location (mean token probability)."""
    probs = out["logits"].float().sigmoid()                                       # (B, N, L)
    weights = positive_map / positive_map.sum(-1, keepdim=True).clamp(min=1)      # (B, R, L)
    return torch.einsum("bnl,brl->brn", probs, weights)


def top1_boxes(out: dict, positive_map: torch.Tensor) -> torch.Tensor:
    """(B, R, 4): per region, the predicted box at the location where its phrase scores highest."""
    best = phrase_scores(out, positive_map).argmax(-1)                           # (B, R)
    boxes = boxes_of(out["locations"][None].float(), out["ltrb"].float())        # (B, N, 4)
    return torch.gather(boxes, 1, best[..., None].expand(*best.shape, 4))


def ranked_boxes(out: dict, positive_map: torch.Tensor, valid: torch.Tensor, k: int,
                 nms_iou: float) -> list[list[torch.Tensor]]:
    """Per image, per valid region (in order): its phrase's top-k boxes (<= k, 4) after NMS, best first."""
    scores = phrase_scores(out, positive_map)                                    # (B, R, N)
    boxes = boxes_of(out["locations"][None].float(), out["ltrb"].float())        # (B, N, 4)
    ranked = []
    for s, b, v in zip(scores, boxes, valid.bool()):
        ranked.append([b[nms(b, s[r], nms_iou)[:k]] for r in v.nonzero().flatten().tolist()])
    return ranked


def recall_counts(ranked: list[list[torch.Tensor]], boxes: torch.Tensor, valid: torch.Tensor,
                  ks: tuple[int, ...] = RECALL_AT) -> tuple[list[int], int]:
    """([regions found among the top k boxes at IoU >= 0.5, for each k in ks], regions) of one batch."""
    hits, total = [0] * len(ks), 0
    for per_region, g, v in zip(ranked, boxes, valid.bool()):
        for pred, gt in zip(per_region, g[v]):
            ok = box_iou(pred, gt[None])[:, 0] >= IOU                            # (<= k,)
            for i, k in enumerate(ks):
                hits[i] += bool(ok[:k].any())
            total += 1
    return hits, total


def read_eval_set(method, rank: int, world: int,
                  key: str = "glip.eval.shards") -> tuple[list[tuple[tuple, tuple]], LabelledSet]:
    """This rank's share of the first glip.eval.max_samples scenes of `glip.eval.shards`, in shard order, read by
    the shared labelled-shard reader (`read_labelled(grounding=True)`): per scene the mapped grounding
    row (image normalised) and its (image, [(phrase, box), ...]) for detection; and the set, whose
    skips (the reader's, and the scenes this rank's sample map rejected) the caller checks."""
    sample_map = GroundingSample(method.glip, method.tokenizer())   # uint8 images, normalised here
    norm = sample_map.batch_normalize
    data = read_labelled(method.glip.eval.shards, method.glip.eval.max_samples, rank, world, key=key, grounding=True)
    scenes = []
    for s in data.owned():
        raw = s.raw()
        try:
            row, (_, objects) = sample_map(raw, 0), sample_map.objects(raw)
        except Rejected as r:   # an undecodable image, a region without a box or span
            data.skip_owned(s, r.reason, r.detail)
            continue
        image = norm(row[0][None])[0]
        scenes.append(((image, *row[1:]), (image, objects)))
    return scenes, data


@torch.no_grad()
def grounding_recall(model, rows: list[tuple], batch_size: int, device, nms_iou: float) -> dict[str, float]:
    """Recall@1 and @5 over this rank's grounding rows (boxes ranked after NMS at nms_iou), the counts
    summed over ranks."""
    hits, total = [0] * len(RECALL_AT), 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        images, ids, mask, boxes, valid, pmap = (torch.stack(c).to(device) for c in zip(*chunk))
        out = model(images, ids, mask)
        h, t = recall_counts(ranked_boxes(out, pmap, valid, max(RECALL_AT), nms_iou), boxes, valid)
        hits, total = [a + b for a, b in zip(hits, h)], total + t
    counts = all_reduce(torch.tensor([*hits, total], dtype=torch.float64, device=device), "sum")
    regions = counts[-1]
    return {**{f"grounding_r{k}": float(counts[i] / regions.clamp(min=1)) for i, k in enumerate(RECALL_AT)},
            "grounding_regions": float(regions)}


@torch.no_grad()
def evaluate_glip(model, method, device, key: str = "glip.eval.shards",
                  fraction_key: str = "glip.eval.max_skipped_fraction") -> dict[str, float]:
    """Grounding R@1 / R@5 and, with glip.detection_classes > 0 (and torchmetrics installed), zero-shot
    mAP. More than glip.eval.max_skipped_fraction of the scenes skipped or lost (summed over ranks) stops
    it naming the worst shards and `fraction_key`, before any scoring; below it the skips are counted
    (`grounding_skipped`). `key` / `fraction_key` name where the user set them (`baton evaluate`'s flags)."""
    ecfg = method.glip.eval
    scenes, data = read_eval_set(method, method.info.rank, method.info.world_size, key)
    skipped = data.check_skipped_over_ranks(ecfg.max_skipped_fraction, f"{key}={ecfg.shards!r}", fraction_key)
    scores = grounding_recall(model, [g for g, _ in scenes], ecfg.batch_size, device, method.glip.nms_iou)
    scores["grounding_skipped"] = float(sum(skipped.values()))
    if method.glip.detection_classes:
        from pretrain.glip.detection import zero_shot_map

        scores.update(zero_shot_map(model, method, [d for _, d in scenes], device))
    return scores
