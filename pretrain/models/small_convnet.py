"""Small-image convnets: a plain 3x3 conv-BN-ReLU stack downsampling by 16, with a flatten head.

Why: ImageNet backbones (regnetx_002, resnet18, ...) downsample by 32 and average-pool, so at 64 px
their last map is 2x2, pooled to one vector: where things are in the image is lost. On the demo's
held-out emoji classes that alone costs most of the retrieval quality (from scratch, same trunk,
same 100 s: Recall@1 0.32 with the 4x4 map flattened, 0.12 average-pooled). These nets downsample
by 16 (64 px -> a 4x4 map) and flatten the final map instead of pooling it, as small-image DML
nets do. timm's residual trunks (ResNet, ByobNet) with the same widths and stride ran 1.4x slower a
step on 2 CPU cores and reached a lower Recall@1 in the same time (0.29 against 0.40), so the trunk
is a plain stack of timm's `ConvNormAct` layers.

The head average-pools the map to a fixed `grid` x `grid` (a no-op at the native size: 64 px ->
4x4; smaller inputs such as DINO's 32 px local crops give the same width) and flattens it.
`num_features` is that flattened width (channels x grid x grid): what open_clip's timm adapter
(`timm_pool: flatten`), DINO's head and finetuning read. The timm API is kept (`forward_features`,
`forward_head`, `reset_classifier`, `set_grad_checkpointing`, `stages` for FSDP units), so the
model is built by name everywhere: `timm.create_model("small_convnet", num_classes=0)`.

Registered names:
    small_convnet     widths 32/s2, 64/s2, 64, 128/s2, 128, 256/s2: 0.6 M parameters, 4096 features
    small_convnet_w   the same, 1.5x wider (48 ... 384): 1.3 M parameters, 6144 features
No released weights exist: `pretrained=True` loads only a file timm is pointed at (a baton export's
backbone.safetensors through `pretrained_cfg_overlay=dict(file=...)` or `local-dir:OUT`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import ConvNormAct
from timm.models import register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

# (width, stride) of each 3x3 conv-BN-ReLU layer, before the width multiplier
LAYERS = ((32, 2), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2))
DEFAULT_CFG = {"input_size": (3, 64, 64), "pool_size": (4, 4), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
               "interpolation": "bicubic", "crop_pct": 1.0, "num_classes": 0, "first_conv": "stages.0.conv",
               "classifier": "head.fc", "license": "apache-2.0"}


class FlattenHead(nn.Module):
    """(B, C, H, W) -> average-pooled to (B, C, grid, grid) -> flattened -> optional linear layer."""

    def __init__(self, in_chs: int, grid: int, num_classes: int = 0, drop_rate: float = 0.0):
        super().__init__()
        self.grid = grid
        self.num_features = in_chs * grid * grid
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.adaptive_avg_pool2d(x, self.grid)
        x = self.drop(x.flatten(1))
        return x if pre_logits else self.fc(x)


def _check_pool(global_pool: Optional[str]) -> None:
    if global_pool not in (None, "", "flatten"):
        raise ValueError(f"small_convnet: global_pool={global_pool!r}; it flattens its final map "
                         f"(global_pool='flatten'): pooling it would lose the layout it is built to keep")


class SmallConvNet(nn.Module):
    """See the module docstring. `layers`: (width, stride) per conv layer."""

    def __init__(self, layers: Sequence[tuple[int, int]] = LAYERS, num_classes: int = 0, in_chans: int = 3,
                 global_pool: Optional[str] = "flatten", grid: int = 4, drop_rate: float = 0.0):
        super().__init__()
        _check_pool(global_pool)
        convs, chs = [], in_chans
        for width, stride in layers:
            convs.append(ConvNormAct(chs, width, 3, stride=stride, bias=False))
            chs = width
        self.stages = nn.Sequential(*convs)
        self.head = FlattenHead(chs, grid, num_classes, drop_rate)
        self.num_features = self.head_hidden_size = self.head.num_features
        self.num_classes, self.drop_rate, self.global_pool = num_classes, drop_rate, "flatten"
        self.grad_checkpointing = False
        self.pretrained_cfg = self.default_cfg = dict(DEFAULT_CFG)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        _check_pool(global_pool)
        self.num_classes = num_classes
        self.head = FlattenHead(self.stages[-1].conv.out_channels, self.head.grid, num_classes, self.drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.stages:
            x = checkpoint(layer, x, use_reentrant=False) if self.grad_checkpointing and x.requires_grad \
                else layer(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _weights_cfg(pretrained_cfg: Any, overlay: Optional[dict]) -> dict:
    """The pretrained cfg timm's loader reads: DEFAULT_CFG under what `timm.create_model` passed
    (a dict from `local-dir:`, or `pretrained_cfg_overlay=dict(file=...)`)."""
    if hasattr(pretrained_cfg, "to_dict"):  # timm's PretrainedCfg
        pretrained_cfg = pretrained_cfg.to_dict()
    return {**DEFAULT_CFG, **(pretrained_cfg if isinstance(pretrained_cfg, dict) else {}), **(overlay or {})}


def _create(width: float, pretrained: bool, **kwargs: Any) -> SmallConvNet:
    """Build the net; with `pretrained`, load the weights file timm was pointed at (a baton
    export's backbone.safetensors), as for any timm model: no released weights exist to download."""
    weights = _weights_cfg(kwargs.pop("pretrained_cfg", None), kwargs.pop("pretrained_cfg_overlay", None))
    if pretrained and not (weights.get("file") or weights.get("state_dict")):
        raise RuntimeError("small_convnet has no released weights: pretrain one with baton and load its "
                           "export (timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay="
                           "dict(file='OUT/backbone.safetensors')), or backbone=OUT in finetuning)")
    for factory_only in ("cache_dir", "features_only"):
        kwargs.pop(factory_only, None)  # timm.create_model's own arguments
    model = SmallConvNet([(int(round(c * width)), s) for c, s in LAYERS], **kwargs)
    if pretrained:
        from timm.models import load_pretrained

        load_pretrained(model, pretrained_cfg=weights, num_classes=model.num_classes,
                        in_chans=kwargs.get("in_chans", 3))
    return model


@register_model
def small_convnet(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """Widths 32 ... 256: 0.6 M parameters, 4096 features at 64 px."""
    return _create(1.0, pretrained, **kwargs)


@register_model
def small_convnet_w(pretrained: bool = False, **kwargs: Any) -> SmallConvNet:
    """1.5x wider (48 ... 384): 1.3 M parameters, 6144 features."""
    return _create(1.5, pretrained, **kwargs)
