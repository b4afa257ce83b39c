"""DINO's networks: a timm backbone + the DINO head, as a student and an EMA teacher in ONE module.

`DinoModel` holds `student`, `teacher` (same architecture, no stochastic depth, requires_grad
False) and the `center` buffer, so a strategy (DDP, FSDP2, DeepSpeed) wraps, shards and
checkpoints all of DINO's state as one module. Its forward takes the crops and returns the
student's head outputs for all crops and the teacher's for the two global crops (no gradient).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from baton.errors import BatonError
from pretrain.dino.config import DinoConfig
from pretrain.timm_weights import architecture_kwargs, create_backbone


class DinoHead(nn.Module):
    """vision_transformer.py's DINOHead: MLP (Linear-GELU x (layers-1), Linear to the bottleneck),
    L2-normalised bottleneck, then a weight-normalised Linear (no bias) to `out_dim`. The
    weight-norm gain starts at 1 and, with `norm_last_layer`, stays there (not trained), so each
    output logit is a cosine similarity to a unit prototype: the reference finds this stabler."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True):
        super().__init__()
        layers = max(layers, 1)
        if layers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            mods: list[nn.Module] = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(layers - 2):
                mods += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            mods.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*mods)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)


class MultiCropNet(nn.Module):
    """Backbone + head over a list of crops: consecutive crops of the same size go through the
    backbone as one batch (utils.MultiCropWrapper), the features of all crops through the head."""

    def __init__(self, backbone: nn.Module, head: DinoHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor], return_features: bool = False):
        """The head's outputs for all crops; with `return_features`, also the backbone's features
        (all crops, the same row order)."""
        feats, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            out = self.backbone(torch.cat(list(crops[start:end])))
            feats.append(out[0] if isinstance(out, (tuple, list)) else out)
            start = end
        feats = torch.cat(feats)
        return (self.head(feats), feats) if return_features else self.head(feats)


def timm_kwargs(cfg: DinoConfig) -> dict[str, Any]:
    """The `timm.create_model` kwargs of the architecture (also the handoff's model_config)."""
    return architecture_kwargs("dino", cfg.backbone, cfg.backbone_kwargs)


def build_backbone(cfg: DinoConfig, drop_path_rate: float = 0.0, weights: bool = True) -> nn.Module:
    """DINO's timm backbone with dino.pretrained's starting weights (random when not `weights`: the
    module an export loads a checkpoint into)."""
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    model = create_backbone("dino", cfg.backbone, cfg.backbone_kwargs, cfg.pretrained, weights=weights, **extra)
    if cfg.local_crop_size != cfg.global_crop_size and getattr(model, "dynamic_img_size", None) is False:
        raise BatonError(f"dino.backbone {cfg.backbone} has a fixed input size but the local crops "
                         f"({cfg.local_crop_size} px) differ from the global ones ({cfg.global_crop_size} px): "
                         f"set dino.backbone_kwargs.dynamic_img_size=true")
    return model


def build_head(cfg: DinoConfig, in_dim: int) -> DinoHead:
    return DinoHead(in_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers, cfg.norm_last_layer)


class DinoModel(nn.Module):
    """Student, EMA teacher and the loss centre; `forward(*crops) -> (student_out, teacher_out)`, with
    `return_features=True` also the student backbone's features of the 2 global crops (KoLeo)."""

    def __init__(self, cfg: DinoConfig):
        super().__init__()
        s_backbone = build_backbone(cfg, cfg.drop_path_rate)
        self.embed_dim = int(s_backbone.num_features)
        self.student = MultiCropNet(s_backbone, build_head(cfg, self.embed_dim))
        self.teacher = MultiCropNet(build_backbone(cfg), build_head(cfg, self.embed_dim))
        self.teacher.load_state_dict(self.student.state_dict())  # both start from the same weights
        self.teacher.requires_grad_(False)                        # no backpropagation through it
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))

    def forward(self, *crops: torch.Tensor, return_features: bool = False) -> tuple[torch.Tensor, ...]:
        if len(crops) < 2:
            raise BatonError(f"DINO needs at least the 2 global crops, got {len(crops)} tensor(s)")
        with torch.no_grad():
            teacher_out = self.teacher(crops[:2])  # only the global views pass through the teacher
        if not return_features:
            return self.student(crops), teacher_out
        student_out, feats = self.student(crops, return_features=True)
        globals_ = crops[0].shape[0] + crops[1].shape[0]
        return student_out, teacher_out, feats[:globals_]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """`train.grad_checkpointing`: timm's activation recomputation in the student's backbone (the
        teacher runs without gradients, so it keeps no activations anyway)."""
        if not hasattr(self.student.backbone, "set_grad_checkpointing"):
            raise BatonError(f"train.grad_checkpointing: timm's {type(self.student.backbone).__name__} "
                             f"has no set_grad_checkpointing")
        self.student.backbone.set_grad_checkpointing(enable)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (as
        main_dino.py; buffers are not averaged). Elementwise, so it works shard-locally on FSDP2's
        DTensors."""
        for s, t in zip(self.student.parameters(), self.teacher.parameters()):
            t.mul_(momentum).add_((1.0 - momentum) * s.detach())
