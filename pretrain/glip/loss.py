"""GLIP's training targets and loss: FCOS assignment, token-level focal loss, GIoU, centerness BCE.

Assignment (FCOS with centre sampling, as GLIP's FCOS variant; one feature level, so no size
ranges): a location is a candidate for a box when it lies inside the box and within
`center_radius` strides of its centre (in x and y); of several candidate boxes the smallest by
area wins; a location with none is negative. A positive location's alignment target is its box's
row of the positive map (the tokens of the box's phrase), so grounding is a multi-label problem
over the caption's tokens rather than over a fixed class list: GLIP's reformulation.

Loss (GLIP's ATSS head, `token_sigmoid_binary_focal_loss`, GIoU and centerness):
- alignment: sigmoid focal loss (alpha, gamma) over every location x real token (padding tokens
  left out), summed and divided by the number of positive locations;
- box: GIoU loss of the decoded box at each positive location, weighted by its centerness target
  and divided by the sum of those targets;
- centerness: BCE of the centerness logit against sqrt(min(l,r)/max(l,r) x min(t,b)/max(t,b)),
  over the positives, divided by their number.
The normalisers are averaged over ranks (`reduce_mean`), as GLIP does, so that DDP's gradient
mean over N ranks equals one process on the N x larger batch.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from pretrain.glip.config import GlipConfig


def assign_locations(locations: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, stride: float,
                     radius: float) -> torch.Tensor:
    """(N, 2) locations, (B, R, 4) boxes, (B, R) valid -> (B, N) index of the assigned box, -1: negative."""
    x, y = locations[None, :, None, 0], locations[None, :, None, 1]          # (1, N, 1)
    x0, y0, x1, y1 = (boxes[:, None, :, i] for i in range(4))                 # (B, 1, R)
    inside = (x > x0) & (x < x1) & (y > y0) & (y < y1)
    near = ((x - (x0 + x1) / 2).abs() < radius * stride) & ((y - (y0 + y1) / 2).abs() < radius * stride)
    ok = inside & near & valid[:, None, :].bool()
    area = ((x1 - x0) * (y1 - y0)).expand_as(ok).masked_fill(~ok, float("inf"))
    best_area, best = area.min(dim=2)
    return torch.where(torch.isfinite(best_area), best, torch.full_like(best, -1))


def gather_per_location(per_box: torch.Tensor, assigned: torch.Tensor) -> torch.Tensor:
    """(B, R, ...) per-box values -> (B, N, ...) of each location's box (zeros at negatives)."""
    idx = assigned.clamp(min=0)
    out = per_box[torch.arange(per_box.shape[0], device=per_box.device)[:, None], idx]
    return out * (assigned >= 0).view(*assigned.shape, *([1] * (per_box.ndim - 2))).to(out.dtype)


def ltrb_of(locations: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances (..., 4) from locations (..., 2) to the sides of boxes (..., 4)."""
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack([x - boxes[..., 0], y - boxes[..., 1], boxes[..., 2] - x, boxes[..., 3] - y], -1)


def boxes_of(locations: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    """The inverse of `ltrb_of`: (x0, y0, x1, y1) boxes from locations and distances."""
    x, y = locations[..., 0], locations[..., 1]
    return torch.stack([x - ltrb[..., 0], y - ltrb[..., 1], x + ltrb[..., 2], y + ltrb[..., 3]], -1)


def centerness_of(ltrb: torch.Tensor) -> torch.Tensor:
    lr, tb = ltrb[..., [0, 2]].clamp(min=0), ltrb[..., [1, 3]].clamp(min=0)
    ratio_x = lr.min(-1).values / lr.max(-1).values.clamp(min=1e-6)
    ratio_y = tb.min(-1).values / tb.max(-1).values.clamp(min=1e-6)
    return (ratio_x * ratio_y).sqrt()


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def glip_loss(out: dict, boxes: torch.Tensor, valid: torch.Tensor, positive_map: torch.Tensor,
              attention_mask: torch.Tensor, cfg: GlipConfig,
              reduce_mean: Callable[[torch.Tensor], torch.Tensor] = _identity) -> tuple[torch.Tensor, dict]:
    """The model's outputs (with "stride", the map's cell size in pixels) and a batch's targets (boxes
    (B, R, 4) in pixels, valid (B, R), positive_map (B, R, L), attention_mask (B, L)) -> (total loss,
    its parts as detached 0-dim tensors). Computed in float32."""
    locations = out["locations"].float()
    logits, ltrb, ctr_logits = out["logits"].float(), out["ltrb"].float(), out["centerness"].float()
    stride = float(out["stride"])   # a Python float from the model: reading it off `locations` would sync the device
    assigned = assign_locations(locations, boxes.float(), valid, stride, cfg.center_radius)
    positive = assigned >= 0
    num_pos = reduce_mean(positive.sum().float().detach()).clamp(min=1.0)

    targets = gather_per_location(positive_map.float(), assigned)                        # (B, N, L)
    focal = sigmoid_focal_loss(logits, targets, alpha=cfg.focal_alpha, gamma=cfg.focal_gamma, reduction="none")
    align = (focal * attention_mask[:, None, :].to(focal.dtype)).sum() / num_pos

    box_targets = gather_per_location(boxes.float(), assigned)[positive]                 # (P, 4)
    loc = locations[None].expand(*assigned.shape, 2)[positive]
    ctr_targets = centerness_of(ltrb_of(loc, box_targets))
    ctr_norm = reduce_mean(ctr_targets.sum().detach()).clamp(min=1e-6)
    if positive.any():
        giou = generalized_box_iou_loss(boxes_of(loc, ltrb[positive]), box_targets, reduction="none")
        box = (giou * ctr_targets).sum() / ctr_norm
        centerness = F.binary_cross_entropy_with_logits(ctr_logits[positive], ctr_targets, reduction="sum") / num_pos
    else:  # still part of the graph, so every rank's backward reaches every parameter (DDP)
        box = centerness = (ltrb.sum() + ctr_logits.sum()) * 0.0
    total = align + cfg.box_loss_weight * box + cfg.centerness_loss_weight * centerness
    # detached 0-dim tensors, read on the host only on a logged step (no device sync per step)
    return total, {"align_loss": align.detach(), "box_loss": box.detach(),
                   "centerness_loss": centerness.detach(), "positives": positive.sum().float()}
