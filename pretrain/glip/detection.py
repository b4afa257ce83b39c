"""Detection from a grounding model: class names as a prompt, boxes per class, zero-shot mAP.

GLIP detects by grounding: the label set becomes a prompt "cat. dog. traffic light." and a class's
score at a location is the alignment probability over its name's tokens (here their mean). Boxes
above `glip.score_threshold` go through per-class NMS (`torchvision.ops.batched_nms`) and the top
`glip.max_detections` stay. A label set longer than one prompt (`glip.max_tokens`) is split into
several prompts, each run separately, their detections merged per image, as GLIP does for LVIS.

Zero-shot detection mAP: on `glip.eval.shards` (held-out scenes of classes never trained on), the
classes are the evaluated scenes' phrases (the first `glip.detection_classes` in sorted order), the
metric torchmetrics' `MeanAveragePrecision` (COCO mAP@[.5:.95] and mAP@.5), which synchronises
itself over ranks.
"""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms

from pretrain.glip.data import positive_map_of
from pretrain.glip.loss import boxes_of


def class_prompt(names: list[str]) -> tuple[str, list[list[int]]]:
    """"cat. dog." and each name's character span [start, end)."""
    caption, spans = "", []
    for name in names:
        spans.append([len(caption), len(caption) + len(name)])
        caption += f"{name}. "
    return caption.rstrip(), spans


def prompt_chunks(names: list[str], tokenizer, max_tokens: int) -> list[list[str]]:
    """Consecutive groups of names whose prompt fits in max_tokens tokens (a name too long alone is
    still its own group: its cut-off tokens simply score nothing)."""
    chunks: list[list[str]] = []
    for name in names:
        if chunks and len(tokenizer(class_prompt(chunks[-1] + [name])[0])["input_ids"]) <= max_tokens:
            chunks[-1].append(name)
        else:
            chunks.append([name])
    return chunks


def encode_prompt(names: list[str], tokenizer, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids (L,), mask (L,), class token map (C, L)) of the prompt of `names`."""
    caption, spans = class_prompt(names)
    enc = tokenizer(caption, padding="max_length", truncation=True, max_length=max_tokens, return_offsets_mapping=True)
    return (torch.tensor(enc["input_ids"]), torch.tensor(enc["attention_mask"]),
            positive_map_of(enc["offset_mapping"], [[s] for s in spans], max_tokens))


def detect(out: dict, class_map: torch.Tensor, score_threshold: float, nms_iou: float,
           max_detections: int) -> list[dict[str, torch.Tensor]]:
    """The model's outputs for one prompt and its (C, L) class token map -> per image
    {"boxes" (K, 4), "scores" (K,), "labels" (K,)}, best first."""
    probs = out["logits"].float().sigmoid()                                             # (B, N, L)
    weights = class_map.to(probs) / class_map.to(probs).sum(-1, keepdim=True).clamp(min=1)
    scores = probs @ weights.T                                                          # (B, N, C)
    boxes = boxes_of(out["locations"][None].float(), out["ltrb"].float())               # (B, N, 4)
    results = []
    for s, b in zip(scores, boxes):
        loc, label = (s > score_threshold).nonzero(as_tuple=True)
        cand_boxes, cand_scores = b[loc], s[loc, label]
        keep = batched_nms(cand_boxes, cand_scores, label, nms_iou)[:max_detections]
        results.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": label[keep]})
    return results


def merge(parts: list[dict[str, torch.Tensor]], max_detections: int) -> dict[str, torch.Tensor]:
    """One image's detections from several prompts (labels already global): the best max_detections."""
    cat = {k: torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "labels")}
    order = cat["scores"].argsort(descending=True)[:max_detections]
    return {k: v[order] for k, v in cat.items()}


@torch.no_grad()
def detect_classes(model, images: torch.Tensor, names: list[str], tokenizer, cfg) -> list[dict[str, torch.Tensor]]:
    """Detections of the classes `names` (labels index `names`) in normalised images (B, 3, S, S)."""
    per_image: list[list[dict]] = [[] for _ in range(images.shape[0])]
    start = 0
    for chunk in prompt_chunks(names, tokenizer, cfg.max_tokens):
        ids, mask, class_map = encode_prompt(chunk, tokenizer, cfg.max_tokens)
        b = images.shape[0]
        out = model(images, ids.to(images.device).expand(b, -1), mask.to(images.device).expand(b, -1))
        for i, det in enumerate(detect(out, class_map.to(images.device), cfg.score_threshold, cfg.nms_iou,
                                       cfg.max_detections)):
            per_image[i].append({**det, "labels": det["labels"] + start})
        start += len(chunk)
    return [merge(parts, cfg.max_detections) for parts in per_image]


def zero_shot_map(model, method, scenes: list[tuple[torch.Tensor, list]], device) -> dict[str, float]:
    """COCO mAP of detecting the scenes' classes by name. `scenes`: this rank's (normalised image,
    [(phrase, box), ...]); the class list is the union over ranks, so every rank prompts the same."""
    from baton.distributed import all_gather_object

    try:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type="bbox", box_format="xyxy")
    except (ImportError, ModuleNotFoundError):  # torchmetrics absent, or without a COCO backend
        return {}
    cfg = method.glip
    local = sorted({p for _, objs in scenes for p, _ in objs})
    names = sorted({n for part in all_gather_object(local) for n in part})[:cfg.detection_classes]
    if not names:
        return {}
    index = {n: i for i, n in enumerate(names)}
    batch = method.glip.eval.batch_size
    for start in range(0, len(scenes), batch):
        rows = scenes[start:start + batch]
        images = torch.stack([img for img, _ in rows]).to(device)
        found = detect_classes(model, images, names, method.tokenizer(), cfg)
        preds = [{k: v.cpu() for k, v in d.items()} for d in found]
        targets = []
        for _, objs in rows:
            kept = [(index[p], b) for p, b in objs if p in index]
            targets.append({"boxes": torch.tensor([b for _, b in kept], dtype=torch.float32).reshape(-1, 4),
                            "labels": torch.tensor([c for c, _ in kept], dtype=torch.long)})
        metric.update(preds, targets)
    scores = metric.compute()
    return {"zero_shot_map": float(scores["map"]), "zero_shot_map50": float(scores["map_50"]),
            "zero_shot_classes": float(len(names))}
