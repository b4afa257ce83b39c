"""GLIP's grounding evaluation against a plain reference: per phrase, locations ranked by the mean
probability of its tokens, greedy NMS written out, a region found at k when one of its first k boxes
has IoU >= 0.5 (Recall@1 and Recall@5, the Flickr30k protocol)."""

from __future__ import annotations

import torch
from torchvision.ops import box_iou

from pretrain.glip.evaluation import grounding_recall, ranked_boxes, recall_counts, top1_boxes
from pretrain.glip.loss import boxes_of
from test_glip import grid

NMS_IOU = 0.6


def random_outputs(seed: int = 0, b: int = 4, r: int = 3, l: int = 8):
    """A dense head's outputs on a 4 x 4 grid (stride 16): as a trained one, its locations predict
    near-copies of a few boxes (5 clusters per image), so ranking without NMS would fill the top 5
    with one box. A random positive map and, as ground truth, a random cluster's box per region."""
    from pretrain.glip.loss import ltrb_of

    g = torch.Generator().manual_seed(seed)
    locs = grid(4, 4, 16.0)
    corner = torch.rand(b, 5, 2, generator=g) * 40
    clusters = torch.cat([corner, corner + 12 + torch.rand(b, 5, 2, generator=g) * 12], -1)    # (b, 5, 4)
    member = torch.randint(0, 5, (b, 16), generator=g)
    pred = torch.gather(clusters, 1, member[..., None].expand(b, 16, 4)) + torch.rand(b, 16, 4, generator=g)
    out = {"locations": locs, "logits": torch.randn(b, 16, l, generator=g) * 2,
           "ltrb": ltrb_of(locs[None], pred), "centerness": torch.zeros(b, 16), "stride": 16.0}
    pmap = (torch.rand(b, r, l, generator=g) < 0.3).float()
    pmap[..., 1] = 1.0                                   # every phrase has a token
    valid = torch.rand(b, r, generator=g) < 0.8
    valid[:, 0] = True
    pick = torch.randint(0, 5, (b, r), generator=g)
    boxes = torch.gather(clusters, 1, pick[..., None].expand(b, r, 4)) + torch.rand(b, r, 4, generator=g)
    return out, pmap, valid, boxes


def reference_hits(out, pmap, valid, boxes, ks=(1, 5)):
    """Loops: each phrase's locations by score, greedy NMS (drop a box overlapping a kept one by more
    than NMS_IOU), found at k when a kept box among the first k has IoU >= 0.5 with the region."""
    pred = boxes_of(out["locations"][None], out["ltrb"])
    probs = out["logits"].sigmoid()
    hits, total = [0] * len(ks), 0
    for i in range(pmap.shape[0]):
        for r in range(pmap.shape[1]):
            if not valid[i, r]:
                continue
            tokens = pmap[i, r] > 0
            order = sorted(range(16), key=lambda n: -float(probs[i, n, tokens].mean()))
            kept: list[int] = []
            for n in order:
                if all(float(box_iou(pred[i, n][None], pred[i, m][None])) <= NMS_IOU for m in kept):
                    kept.append(n)
            found = [float(box_iou(pred[i, n][None], boxes[i, r][None])) >= 0.5 for n in kept]
            for j, k in enumerate(ks):
                hits[j] += any(found[:k])
            total += 1
    return hits, total


def test_recall_at_1_and_5_match_the_loop_reference():
    for seed in range(3):
        out, pmap, valid, boxes = random_outputs(seed)
        ranked = ranked_boxes(out, pmap, valid, 5, NMS_IOU)
        assert recall_counts(ranked, boxes, valid) == reference_hits(out, pmap, valid, boxes), seed
        # the first ranked box is the top-1 box of `baton ground`
        top1 = top1_boxes(out, pmap)
        for i, per_region in enumerate(ranked):
            for r, pred in zip(valid[i].nonzero().flatten().tolist(), per_region):
                assert torch.equal(pred[0], top1[i, r]) and len(pred) <= 5
    hits, total = reference_hits(*random_outputs(0))
    assert hits[0] < hits[1] < total        # the case tells R@1 from R@5


class Fixed(torch.nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, images, ids, mask):
        return self.out


def test_grounding_recall_logs_r1_and_r5():
    out, pmap, valid, boxes = random_outputs(1)
    rows = [(torch.zeros(3, 64, 64), torch.zeros(8, dtype=torch.long), torch.ones(8, dtype=torch.long), boxes[i],
             valid[i], pmap[i]) for i in range(len(boxes))]
    got = grounding_recall(Fixed(out), rows, batch_size=len(rows), device=torch.device("cpu"), nms_iou=NMS_IOU)
    (h1, h5), total = reference_hits(out, pmap, valid, boxes)
    assert got == {"grounding_r1": h1 / total, "grounding_r5": h5 / total, "grounding_regions": float(total)}
