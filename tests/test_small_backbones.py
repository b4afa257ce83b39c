"""baton's small-image backbones (pretrain/models/): built by name through timm and open_clip,
their flatten head keeps the layout that average pooling loses, and they go through every stage's
builder (CLIP image tower, DINO backbone, handoff, finetuning, `random:`); finetuning's frozen
BatchNorm switch keeps the pretrained statistics while the weights learn."""

from __future__ import annotations

import pytest
import torch

from pretrain.models import register_timm_models

register_timm_models()
CLIP_CFG = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "timm_model_name": "small_convnet",
                                            "timm_pool": "flatten", "timm_proj": "linear"},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def test_small_convnet_is_a_timm_model_whose_features_keep_the_layout():
    import timm

    torch.manual_seed(0)
    net = timm.create_model("small_convnet", num_classes=0).eval()
    assert net.num_features == 256 * 4 * 4
    x = torch.rand(2, 3, 64, 64)
    feats = net(x)
    assert feats.shape == (2, net.num_features)
    assert torch.allclose(feats, net.forward_head(net.forward_features(x)))
    assert net(torch.rand(2, 3, 32, 32)).shape == feats.shape  # DINO's local crops: the same width
    # Swapping the image's quadrants keeps every pooled statistic of a global-average head (nearly:
    # borders differ) but moves the features around in the flattened map: the layout is kept.
    swapped = torch.cat([x[..., 32:, :], x[..., :32, :]], dim=-2)
    f_swapped = net(swapped)
    assert not torch.allclose(f_swapped, feats, atol=1e-3)
    as_map = lambda f: f.view(2, 256, 4, 4)  # noqa: E731
    assert torch.allclose(as_map(f_swapped).mean((2, 3)), as_map(feats).mean((2, 3)), rtol=0.25, atol=0.05)
    classifier = timm.create_model("small_convnet", num_classes=7)
    assert classifier(x).shape == (2, 7) and classifier.get_classifier().in_features == net.num_features
    with pytest.raises(ValueError, match="flatten"):
        timm.create_model("small_convnet", global_pool="avg")
    with pytest.raises(RuntimeError, match="no released weights"):
        timm.create_model("small_convnet", pretrained=True)


def test_small_convnet_is_a_clip_image_tower_and_a_handoff(tmp_path):
    import open_clip

    from baton.handoff import write_handoff
    from finetune.model import load_backbone
    from pretrain.backbones import load_backbone as load_handoff

    torch.manual_seed(0)
    clip = open_clip.CLIP(**CLIP_CFG).eval()
    images = torch.rand(3, 3, 32, 32)
    meta = {"library": "open_clip", "architecture": "small", "model_config": CLIP_CFG, "tower": "visual",
            "embedding_dim": 16, "preprocess": {"image_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3,
                                                "interpolation": "bicubic"}, "source": {}}
    write_handoff(tmp_path / "h", clip.visual.state_dict(), meta)
    tower, _ = load_handoff(tmp_path / "h")
    with torch.no_grad():
        assert torch.equal(tower(images), clip.encode_image(images))
    torch.manual_seed(1)
    scratch, smeta = load_backbone(f"random:{tmp_path / 'h'}")   # the same architecture, untrained
    assert smeta["source"] == {"random_init_like": str(tmp_path / "h")} and "text" not in smeta
    with torch.no_grad():
        assert scratch.eval()(images).shape == (3, 16) and not torch.allclose(scratch(images), tower(images))
    with pytest.raises(Exception, match="no released weights"):  # timm:NAME asks for released weights
        load_backbone("timm:small_convnet")


def test_dino_builds_a_small_convnet_backbone():
    from pretrain.dino.config import DinoConfig
    from pretrain.dino.model import build_backbone

    net = build_backbone(DinoConfig(backbone="small_convnet", global_crop_size=64, local_crop_size=32))
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 4096)


def test_frozen_batchnorm_keeps_the_statistics_while_the_weights_learn():
    import timm

    from finetune.model import EmbeddingModel

    torch.manual_seed(0)
    results = {}
    for frozen in (False, True):
        torch.manual_seed(0)
        model = EmbeddingModel(timm.create_model("small_convnet", num_classes=0), 4096, 8,
                               freeze_batchnorm=frozen).train()
        bn = model.backbone.stages[0].bn
        before = (bn.running_mean.clone(), bn.weight.detach().clone())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.rand(4, 3, 64, 64)).sum().backward()
        opt.step()
        results[frozen] = (torch.equal(bn.running_mean, before[0]), torch.equal(bn.weight, before[1]))
        assert model.training and bn.training == (not frozen)
    assert results[False] == (False, False)   # training mode: batch statistics update the running ones
    assert results[True] == (True, False)     # frozen: the statistics stay, the affine weights learn


def test_crop_padding_shifts_the_image_by_up_to_that_many_pixels():
    import numpy as np
    from PIL import Image

    from finetune.model import build_transform

    pp = {"image_size": 16, "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear"}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    plain = build_transform(pp, train=True, crop_scale_min=1.0)(img)
    assert torch.equal(plain, build_transform(pp)(img))  # no crop, no padding: the test transform
    padded = build_transform(pp, train=True, crop_scale_min=1.0, crop_padding=3)
    shifts = set()
    for seed in range(40):
        torch.default_generator.manual_seed(seed)
        out = padded(img)
        assert out.shape == plain.shape
        match = [(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)
                 if torch.equal(out[:, max(dy, 0):16 + min(dy, 0), max(dx, 0):16 + min(dx, 0)],
                                plain[:, max(-dy, 0):16 + min(-dy, 0), max(-dx, 0):16 + min(-dx, 0)])]
        assert match, seed  # every output is the image moved by at most 3 pixels
        shifts.add(match[0])
    assert len(shifts) > 5


def test_the_shift_and_flip_on_tensors_equal_torchvisions_on_pil_images():
    """The finetuning transform shifts and flips the tensor (cheaper than the PIL image): the same
    random draws must give the same pixels as torchvision's PIL pipeline."""
    import numpy as np
    import torchvision.transforms as T
    from PIL import Image

    from finetune.model import build_transform

    pp = {"image_size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.3, 0.25], "interpolation": "bicubic"}
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    ours = build_transform(pp, train=True, crop_scale_min=1.0, crop_padding=3, hflip=True)
    pil = T.Compose([T.Resize((16, 16), interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                     T.RandomCrop(16, padding=3, padding_mode="edge"), T.RandomHorizontalFlip(),
                     T.ToTensor(), T.Normalize(pp["mean"], pp["std"])])
    for seed in range(20):
        torch.default_generator.manual_seed(seed)
        a = ours(img)
        torch.default_generator.manual_seed(seed)
        assert torch.equal(a, pil(img)), seed
