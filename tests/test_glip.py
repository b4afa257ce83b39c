"""GLIP's components against straightforward references: FCOS assignment, the loss (written out as
loops over locations, tokens and boxes, in float64), the positive map from character spans, the
grounding sample map, and the model's output shapes and prior at initialisation."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from PIL import Image

from pretrain.glip.config import GlipConfig
from pretrain.glip.loss import assign_locations, glip_loss


def tiny_glip(**kw) -> GlipConfig:
    base = dict(image_size=64, dim=32, text_width=32, text_layers=1, text_heads=2, fusion_layers=1,
                fusion_heads=2, head_convs=1, max_tokens=16, max_regions=4)
    return GlipConfig(**{**base, **kw})


def grid(h: int, w: int, stride: float) -> torch.Tensor:
    return torch.tensor([[(j + 0.5) * stride, (i + 0.5) * stride] for i in range(h) for j in range(w)])


def reference_assign(locs, boxes, valid, stride, radius):
    out = []
    for b in range(boxes.shape[0]):
        row = []
        for x, y in locs.tolist():
            best, best_area = -1, math.inf
            for r, (x0, y0, x1, y1) in enumerate(boxes[b].tolist()):
                if not valid[b, r]:
                    continue
                inside = x0 < x < x1 and y0 < y < y1
                near = abs(x - (x0 + x1) / 2) < radius * stride and abs(y - (y0 + y1) / 2) < radius * stride
                area = (x1 - x0) * (y1 - y0)
                if inside and near and area < best_area:
                    best, best_area = r, area
            row.append(best)
        out.append(row)
    return torch.tensor(out)


def reference_loss(out, boxes, valid, pmap, mask, cfg):
    """GLIP's loss written out element by element (float64), from the assignment of `reference_assign`."""
    locs = out["locations"].double()
    stride = float(locs[0, 0]) * 2
    assigned = reference_assign(locs, boxes, valid, stride, cfg.center_radius)
    num_pos = max(float((assigned >= 0).sum()), 1.0)
    a, g = cfg.focal_alpha, cfg.focal_gamma
    align = 0.0
    giou_sum, ctr_sum, bce_sum = 0.0, 0.0, 0.0
    for b in range(boxes.shape[0]):
        for n, (x, y) in enumerate(locs.tolist()):
            r = int(assigned[b, n])
            for t in range(mask.shape[1]):
                if not mask[b, t]:
                    continue
                target = float(pmap[b, r, t]) if r >= 0 else 0.0
                p = 1 / (1 + math.exp(-float(out["logits"][b, n, t])))
                ce = -(target * math.log(p) + (1 - target) * math.log(1 - p))
                p_t = p * target + (1 - p) * (1 - target)
                align += (a * target + (1 - a) * (1 - target)) * (1 - p_t) ** g * ce
            if r < 0:
                continue
            x0, y0, x1, y1 = boxes[b, r].tolist()
            l, tp, rt, bt = x - x0, y - y0, x1 - x, y1 - y
            ctr = math.sqrt(min(l, rt) / max(l, rt) * min(tp, bt) / max(tp, bt))
            pl, pt, pr, pb = out["ltrb"][b, n].tolist()
            px0, py0, px1, py1 = x - pl, y - pt, x + pr, y + pb
            inter = max(0.0, min(px1, x1) - max(px0, x0)) * max(0.0, min(py1, y1) - max(py0, y0))
            union = (px1 - px0) * (py1 - py0) + (x1 - x0) * (y1 - y0) - inter
            hull = (max(px1, x1) - min(px0, x0)) * (max(py1, y1) - min(py0, y0))
            giou = inter / union - (hull - union) / hull
            giou_sum += (1 - giou) * ctr
            ctr_sum += ctr
            q = 1 / (1 + math.exp(-float(out["centerness"][b, n])))
            bce_sum += -(ctr * math.log(q) + (1 - ctr) * math.log(1 - q))
    align, box, centerness = align / num_pos, giou_sum / ctr_sum, bce_sum / num_pos
    return align + cfg.box_loss_weight * box + cfg.centerness_loss_weight * centerness, align, box, centerness


def small_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    B, R, L, stride = 2, 3, 6, 16.0
    locs = grid(4, 4, stride)
    boxes = torch.tensor([[[2., 3., 40., 37.], [20., 18., 60., 62.], [0., 0., 64., 64.]],
                          [[5., 30., 30., 60.], [30., 2., 63., 25.], [8., 8., 24., 24.]]])
    valid = torch.tensor([[1., 1., 0.], [1., 1., 1.]])
    pmap = (torch.rand(B, R, L, generator=g) > 0.6).float()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    out = {"locations": locs, "logits": torch.randn(B, 16, L, generator=g) * 2,
           "ltrb": torch.rand(B, 16, 4, generator=g) * 30 + 1, "centerness": torch.randn(B, 16, generator=g), "stride": stride}
    return out, boxes, valid, pmap, mask


def test_assignment_matches_the_loop_reference():
    out, boxes, valid, *_ = small_case(0)
    for radius in (0.5, 1.5, 9.0):
        got = assign_locations(out["locations"], boxes, valid, 16.0, radius)
        assert torch.equal(got, reference_assign(out["locations"], boxes, valid, 16.0, radius))
    got = assign_locations(out["locations"], boxes, valid, 16.0, 9.0)
    assert (got[0] == 2).sum() == 0              # the invalid box is never assigned
    assert (got >= 0).any() and (got < 0).any()
    # overlapping boxes: the smaller one wins where both qualify
    assert got[0, 5] == 0 and got[0, 10] == 1     # (24, 24) in box 0 and 1, (40, 40) in box 1 only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_the_loop_transcription(seed):
    out, boxes, valid, pmap, mask = small_case(seed)
    cfg = tiny_glip()
    total, parts = glip_loss(out, boxes, valid, pmap, mask, cfg)
    ref_total, align, box, ctr = reference_loss(out, boxes, valid, pmap, mask, cfg)
    assert float(parts["align_loss"]) == pytest.approx(align, rel=1e-5)
    assert float(parts["box_loss"]) == pytest.approx(box, rel=1e-5)
    assert float(parts["centerness_loss"]) == pytest.approx(ctr, rel=1e-5)
    assert float(total) == pytest.approx(ref_total, rel=1e-5)


def test_loss_without_positives_is_finite_and_reaches_every_output():
    out, boxes, valid, pmap, mask = small_case(0)
    out = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) and k != "locations" else v) for k, v in out.items()}
    total, parts = glip_loss(out, boxes, torch.zeros_like(valid), pmap, mask, tiny_glip())
    total.backward()
    assert float(parts["positives"]) == 0 and math.isfinite(float(total.detach()))
    assert all(out[k].grad is not None for k in ("logits", "ltrb", "centerness"))


# ------------------------------------------------------------------ tokens and samples

@pytest.fixture(scope="module")
def tokenizer():
    from pretrain.glip.model import build_tokenizer
    return build_tokenizer(tiny_glip())


def test_positive_map_marks_exactly_the_tokens_of_each_span(tokenizer):
    from pretrain.glip.data import positive_map_of

    caption = "red apple left of cat face"
    enc = tokenizer(caption, padding="max_length", max_length=12, return_offsets_mapping=True)
    words = tokenizer.convert_ids_to_tokens(enc["input_ids"])
    pmap = positive_map_of(enc["offset_mapping"], [[[0, 9]], [[18, 26]], [[0, 3], [18, 21]]], 12)
    assert [w for w, p in zip(words, pmap[0]) if p] == ["red", "apple"]
    assert [w for w, p in zip(words, pmap[1]) if p] == ["cat", "face"]
    assert [w for w, p in zip(words, pmap[2]) if p] == ["red", "cat"]


def png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


def test_sample_map_scales_boxes_drops_cut_and_extra_regions(tokenizer):
    from pretrain.data import Rejected
    from pretrain.glip.data import GroundingSample

    cfg = tiny_glip(max_tokens=8, max_regions=2)
    caption = "cat face and rocket and a very long tail of words"
    regions = [{"bbox": [10, 20, 50, 60], "phrase": "cat face", "tokens_positive": [[0, 8]]},
               {"bbox": [0, 0, 30, 30], "phrase": "words", "tokens_positive": [[44, 49]]},   # cut off at 8 tokens
               {"bbox": [60, 10, 120, 40], "phrase": "rocket", "tokens_positive": [[13, 19]]}]
    record = json.dumps({"caption": caption, "regions": regions}).encode()
    sample = {"__key__": "k", "png": png(128, 64), "json": record}
    image, ids, mask, boxes, valid, pmap = GroundingSample(cfg, tokenizer)(sample, 0)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert valid.tolist() == [1.0, 1.0]
    torch.testing.assert_close(boxes, torch.tensor([[5., 20., 25., 60.], [30., 10., 60., 40.]]))
    words = tokenizer.convert_ids_to_tokens(ids.tolist())
    assert [w for w, p in zip(words, pmap[1]) if p] == ["rocket"] and int(mask.sum()) == 8
    with pytest.raises(Rejected, match="bad_json"):
        GroundingSample(cfg, tokenizer)({"__key__": "k", "png": png(8, 8), "json": b'{"caption": "x"}'}, 0)


@pytest.mark.parametrize("region", [
    {"bbox": [1, 2, 30], "tokens_positive": [[0, 3]]},                  # three numbers
    {"bbox": [1, 2, float("inf"), 30], "tokens_positive": [[0, 3]]},    # not finite
    {"bbox": [1, 2, 30, 30], "tokens_positive": [[0, 3, 5]]},           # a span of three
    {"bbox": [1, 2, 30, 30], "tokens_positive": [[0.5, 3]]},            # not integers
    {"bbox": {"x": 1}, "tokens_positive": [[0, 3]]}, "a string"])
def test_sample_map_rejects_a_malformed_region_in_training_and_evaluation(tokenizer, region):
    """A broken region rejects the scene as bad_json (skipped and counted by the loader and the
    evaluation reader), never an IndexError out of a worker or an infinite box trained on."""
    from pretrain.data import Rejected
    from pretrain.glip.data import GroundingSample

    if isinstance(region, dict):
        region = {**region, "phrase": "cat"}
    record = json.dumps({"caption": "cat face", "regions": [region]}).encode()
    sample = {"__key__": "k", "png": png(64, 64), "json": record}
    mapper = GroundingSample(tiny_glip(), tokenizer)
    with pytest.raises(Rejected, match="bad_json"):
        mapper(sample, 0)
    with pytest.raises(Rejected, match="bad_json"):
        mapper.objects(sample)


def test_sample_map_clips_boxes_to_the_image_and_drops_what_is_left_of_none(tokenizer):
    from pretrain.glip.data import GroundingSample

    cfg = tiny_glip()    # image_size 64: a 128 x 64 image scales x by 1/2
    regions = [{"bbox": [-5, 10, 140, 70], "phrase": "cat", "tokens_positive": [[0, 3]]},     # clipped
               {"bbox": [200, 10, 300, 40], "phrase": "cat", "tokens_positive": [[0, 3]]},    # past the image
               {"bbox": [50, 40, 10, 20], "phrase": "cat", "tokens_positive": [[0, 3]]}]      # swapped corners
    sample = {"__key__": "k", "png": png(128, 64),
              "json": json.dumps({"caption": "cat face", "regions": regions}).encode()}
    mapper = GroundingSample(cfg, tokenizer)
    _, _, _, boxes, valid, _ = mapper(sample, 0)
    assert valid.sum() == 1
    torch.testing.assert_close(boxes[0], torch.tensor([0., 10., 64., 64.]))
    assert mapper.objects(sample)[1] == [("cat", [0., 10., 64., 64.])]


def test_model_outputs_and_prior_at_initialisation(tokenizer):
    from pretrain.glip.model import GlipModel

    cfg = tiny_glip()
    torch.manual_seed(0)
    model = GlipModel(cfg, len(tokenizer), tokenizer.pad_token_id)
    enc = tokenizer(["cat face", "a rocket and a cat"], padding="max_length", max_length=16, return_tensors="pt")
    out = model(torch.randn(2, 3, 64, 64), enc["input_ids"], enc["attention_mask"])
    assert out["logits"].shape == (2, 16, 16) and out["ltrb"].shape == (2, 16, 4)
    assert out["centerness"].shape == (2, 16)
    torch.testing.assert_close(out["locations"][:5], grid(4, 4, 16.0)[:5])
    assert out["stride"] == 16.0 and isinstance(out["stride"], float)   # the loss reads it without a sync
    assert (out["ltrb"] > 0).all()
    # scores start near the prior: bias0 = -log((1 - p) / p), cosines scaled by 10 around it
    assert float(torch.sigmoid(out["logits"].detach()).median()) < 0.1


def test_hf_text_encoder_gives_token_features(tokenizer):
    """glip.text_encoder=hf: the packaged MiniLM itself encodes the caption, one feature per token."""
    from pretrain.glip.model import GlipModel

    cfg = tiny_glip(text_encoder="hf")
    model = GlipModel(cfg, len(tokenizer), tokenizer.pad_token_id)
    assert model.text.width == 384
    enc = tokenizer(["cat face"], padding="max_length", max_length=16, return_tensors="pt")
    out = model(torch.randn(1, 3, 64, 64), enc["input_ids"], enc["attention_mask"])
    assert out["logits"].shape == (1, 16, 16)


def test_grounding_puts_a_transparent_image_on_white(tokenizer):
    """`baton ground` reads a user's image with the project's one RGB rule: a transparent
    background (stored black, as most RGBA files store it) is white for the model and the drawing,
    as it was in the shards GLIP trained on."""
    from types import SimpleNamespace

    from pretrain.glip.data import GroundingSample
    from pretrain.glip.ground import draw, ground
    from pretrain.glip.model import GlipModel

    cfg = tiny_glip()
    net = GlipModel(cfg, len(tokenizer), tokenizer.pad_token_id).eval()
    seen = []
    model = lambda pixels, *tokens: seen.append(pixels) or net(pixels, *tokens)   # noqa: E731
    image = Image.new("RGBA", (80, 48), (0, 0, 0, 0))
    image.paste((200, 30, 30, 255), (10, 10, 30, 30))
    found = ground(SimpleNamespace(glip=cfg, tokenizer=lambda: tokenizer), model, image, "red square")
    samples = GroundingSample(cfg, tokenizer)
    on_white = Image.new("RGB", image.size, (255, 255, 255))
    on_white.paste((200, 30, 30), (10, 10, 30, 30))
    assert torch.equal(seen[0], samples.batch_normalize(samples.resize(on_white)[None]))
    assert [f["phrase"] for f in found] == ["red square"]
    picture = draw(image, [])   # no box: a random model's could cross the pixel looked at
    assert picture.mode == "RGB" and picture.getpixel((70, 40)) == (255, 255, 255)
    assert image.mode == "RGBA" and image.getpixel((70, 40)) == (0, 0, 0, 0)


def test_ground_refuses_phrases_past_max_tokens_and_clips_boxes_to_the_image(tokenizer):
    """A phrase no token of which reaches the model is refused by name (its box would be any box);
    the boxes printed lie inside the image."""
    from types import SimpleNamespace

    from baton.errors import BatonError
    from pretrain.glip.ground import ground
    from pretrain.glip.model import GlipModel

    cfg = tiny_glip(max_tokens=8)
    torch.manual_seed(0)
    net = GlipModel(cfg, len(tokenizer), tokenizer.pad_token_id).eval()
    method = SimpleNamespace(glip=cfg, tokenizer=lambda: tokenizer)
    image = Image.new("RGB", (80, 48), (200, 30, 30))
    with pytest.raises(BatonError, match=r"glip.max_tokens=8 .*'cat face' would not reach the model"):
        ground(method, net, image, "red square. blue circle and a long tail. cat face")
    for f in ground(method, net, image, "red square. blue circle"):
        x0, y0, x1, y1 = f["box"]
        assert 0 <= x0 <= x1 <= 80 and 0 <= y0 <= y1 <= 48


@pytest.mark.parametrize("case", ["missing", "not_an_image", "truncated", "bomb", "out_folder", "out_format"])
def test_ground_refuses_a_bad_image_or_out_before_loading_the_run(tmp_path, case, capsys):
    from baton.cli import main as baton_main

    good = tmp_path / "ok.png"
    good.write_bytes(png(16, 16))
    image, out = good, tmp_path / "drawn.png"
    if case == "not_an_image":
        image = tmp_path / "x.png"
        image.write_text("hello")
    elif case == "truncated":
        image = tmp_path / "x.png"
        image.write_bytes(png(16, 16)[:50])
    elif case == "bomb":    # a header declaring 2^30 pixels: Pillow's DecompressionBombError
        image = tmp_path / "x.png"
        import struct
        import zlib
        ihdr = struct.pack(">IIBBBBB", 32768, 32768, 8, 2, 0, 0, 0)
        image.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr
                          + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)))
    elif case == "missing":
        image = tmp_path / "missing.png"
    elif case == "out_folder":
        out = tmp_path / "no" / "drawn.png"
    else:
        out = tmp_path / "drawn.foo"
    assert baton_main(["ground", str(tmp_path / "no-run"), str(image), "cat", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert (str(image) if case not in ("out_folder", "out_format") else "--out") in err


def test_an_unknown_text_encoder_names_the_key_and_the_choices():
    from baton.registry import UnknownName
    from pretrain.glip.model import TextEncoder

    with pytest.raises(UnknownName, match=r"unknown glip.text_encoder 'open-clip' \(did you mean 'open_clip'\?\)"
                                          r": choose one of open_clip, hf$"):
        TextEncoder(tiny_glip(text_encoder="open-clip"), 100, 0)


def test_backbone_kwargs_are_the_architecture_and_weight_keys_stay_out_of_it():
    """timm's weight-choosing kwargs choose GLIP's starting weights (tests/test_timm_interop.py), so
    they are not part of the architecture (the handoff's model_config); any other timm kwarg is, and a
    null one (which timm would drop) is refused naming it."""
    from baton.errors import BatonError
    from pretrain.glip.model import backbone_kwargs

    for weights in ({"pretrained": True}, {"pretrained_cfg_overlay": {"file": "w.safetensors"}}):
        assert backbone_kwargs(GlipConfig(backbone_kwargs={**weights, "output_stride": 16})) == \
            {"model_name": "small_convnet", "num_classes": 0, "output_stride": 16}
    assert backbone_kwargs(GlipConfig(backbone="resnet18", backbone_kwargs={"output_stride": 16})) == \
        {"model_name": "resnet18", "num_classes": 0, "output_stride": 16}
    with pytest.raises(BatonError, match="glip.backbone_kwargs.output_stride is null"):
        backbone_kwargs(GlipConfig(backbone_kwargs={"output_stride": None}))
    with pytest.raises(BatonError, match="glip.backbone_kwargs must be a mapping"):
        backbone_kwargs(GlipConfig(backbone_kwargs=[1]))
