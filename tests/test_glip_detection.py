"""Detection by prompting class names: prompt spans and chunks, scoring + per-class NMS against a
plain reference, and zero-shot mAP end to end with an oracle model (torchmetrics, where installed)."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from pretrain.glip.detection import class_prompt, detect, encode_prompt, prompt_chunks, zero_shot_map
from pretrain.glip.loss import ltrb_of
from test_glip import grid, tiny_glip


@pytest.fixture(scope="module")
def tokenizer():
    from pretrain.glip.model import build_tokenizer
    return build_tokenizer(tiny_glip())


def test_prompt_spans_and_chunks_fit(tokenizer):
    caption, spans = class_prompt(["cat", "traffic light", "dog"])
    assert caption == "cat. traffic light. dog."
    assert [caption[s:e] for s, e in spans] == ["cat", "traffic light", "dog"]
    names = [f"thing {w}" for w in "abcdefghijklmnop"]
    chunks = prompt_chunks(names, tokenizer, 16)
    assert [n for c in chunks for n in c] == names and len(chunks) > 1
    assert all(len(tokenizer(class_prompt(c)[0])["input_ids"]) <= 16 for c in chunks)
    _, _, cmap = encode_prompt(["red apple", "cat"], tokenizer, 16)
    assert cmap.sum(1).tolist() == [2.0, 1.0]


def reference_detect(probs, cmap, boxes, thr, iou):
    """Greedy per-class NMS written out: class score = mean token probability."""
    out = []
    for c in range(cmap.shape[0]):
        score = probs[:, cmap[c] > 0].mean(1)
        cands = sorted(((float(score[n]), n) for n in range(len(score)) if score[n] > thr), reverse=True)
        kept = []
        for s, n in cands:
            if all(float(box_iou(boxes[n][None], boxes[m][None])) <= iou for _, m in kept):
                kept.append((s, n))
        out += [(c, n, s) for s, n in kept]
    return sorted(out, key=lambda t: -t[2])


def test_detect_matches_a_plain_nms_reference():
    g = torch.Generator().manual_seed(0)
    locs = grid(4, 4, 16.0)
    out = {"locations": locs, "logits": torch.randn(1, 16, 6, generator=g) * 3,
           "ltrb": torch.rand(1, 16, 4, generator=g) * 20 + 4, "centerness": torch.zeros(1, 16), "stride": 16.0}
    cmap = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0.]])
    got = detect(out, cmap, 0.3, 0.5, 100)[0]
    from pretrain.glip.loss import boxes_of
    boxes = boxes_of(locs, out["ltrb"][0])
    ref = reference_detect(out["logits"][0].sigmoid(), cmap, boxes, 0.3, 0.5)
    mine, theirs = sorted(zip(got["labels"].tolist(), got["scores"].tolist())), sorted((c, s) for c, _, s in ref)
    assert [c for c, _ in mine] == [c for c, _ in theirs]
    assert [s for _, s in mine] == pytest.approx([s for _, s in theirs], rel=1e-6)
    assert got["scores"].tolist() == sorted(got["scores"].tolist(), reverse=True)
    assert len(ref) > 3 and len(ref) < 3 * 16
    assert len(detect(out, cmap, 0.3, 0.5, 2)[0]["scores"]) == 2


class Oracle(torch.nn.Module):
    """Knows each scene's objects (the scene index is pixel [0, 0, 0]); for a prompt it scores the
    tokens of every present class high at the location nearest the object's centre and predicts
    the exact box there: detection by this 'model' is perfect, so mAP must be 1."""

    def __init__(self, scenes, tokenizer):
        super().__init__()
        self.scenes, self.tokenizer = scenes, tokenizer

    def forward(self, images, ids, mask):
        locs = grid(4, 4, 16.0)
        names = [n.strip() for n in self.tokenizer.decode(ids[0], skip_special_tokens=True).split(".") if n.strip()]
        cmap = encode_prompt(names, self.tokenizer, ids.shape[1])[2]
        logits, ltrb = torch.full((len(images), 16, ids.shape[1]), -9.0), torch.ones(len(images), 16, 4)
        for i, img in enumerate(images):
            for phrase, box in self.scenes[int(img[0, 0, 0])][1]:
                if phrase in names:
                    box = torch.tensor(box)
                    n = int(((locs - (box[:2] + box[2:]) / 2) ** 2).sum(1).argmin())
                    logits[i, n, cmap[names.index(phrase)] > 0] = 9.0
                    ltrb[i, n] = ltrb_of(locs[n], box)
        return {"logits": logits, "ltrb": ltrb, "centerness": torch.zeros(len(images), 16), "locations": locs, "stride": 16.0}


def test_zero_shot_map_of_a_perfect_model_is_one(tokenizer):
    pytest.importorskip("torchmetrics")
    pytest.importorskip("pycocotools")
    from baton.distributed import DistInfo
    from pretrain.config import PretrainConfig
    from pretrain.glip.method import GlipMethod

    objects = [[("red square", [2, 3, 30, 28])], [("blue circle", [30, 30, 60, 62]), ("red square", [0, 34, 20, 60])],
               [("green triangle", [10, 10, 50, 40])],
               [("tiny yellow star", [40, 2, 62, 20]), ("blue circle", [4, 4, 30, 30])]]
    scenes = []
    for i, objs in enumerate(objects):
        img = torch.zeros(3, 64, 64)
        img[0, 0, 0] = i
        scenes.append((img, objs))
    cfg = PretrainConfig(method="glip")
    cfg.glip = tiny_glip(max_tokens=8)
    cfg.glip.eval.batch_size = 3   # 8 tokens: several prompts, two batches
    method = GlipMethod(cfg, DistInfo())
    scores = zero_shot_map(Oracle(scenes, tokenizer), method, scenes, torch.device("cpu"))
    assert scores["zero_shot_classes"] == 4
    assert scores["zero_shot_map"] == pytest.approx(1.0) and scores["zero_shot_map50"] == pytest.approx(1.0)
    cfg.glip.detection_classes = 2                      # only "blue circle", "green triangle" are scored
    assert zero_shot_map(Oracle(scenes, tokenizer), method, scenes, torch.device("cpu"))["zero_shot_classes"] == 2
