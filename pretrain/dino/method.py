"""`DinoMethod`: DINO on the generic pretraining engine (the `PretrainMethod` contract).

The engine owns the loop, strategies, checkpoints and loader; this class says what DINO trains and
how. `step` is the 0-based index of the optimiser step being taken (the same value in
adjust_optimizer, loss and after_step of one iteration), `total` the number of steps of the run;
epochs are `step // steps_per_epoch` with the engine's count of steps per epoch.

Freezing the head's last layer during the first `freeze_last_layer` epochs: the reference drops
those gradients (`cancel_gradients_last_layer`, between backward and step). The contract has no
hook there and a gradient hook interacts differently with each strategy (DDP buckets, FSDP2
reduce-scatter, DeepSpeed partitions), so this sets the last-layer group's learning rate to 0
instead: AdamW then changes neither the weights nor (lr x wd = 0) decays them, identically under
every strategy. The difference from the reference: AdamW's moments and step count see the frozen
epoch's gradients, so the first updates after unfreezing are not bit-identical to it. The gradient
clipping norm includes those gradients in both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from baton.compat import uncompiled
from baton.distributed import DistInfo
from baton.errors import BatonError
from baton.registry import unknown_name
from pretrain.dino import schedules
from pretrain.dino.augment import MultiCrop
from pretrain.dino.config import DinoConfig
from pretrain.dino.koleo import koleo_loss
from pretrain.dino.loss import dino_loss, distillation_loss, sinkhorn_knopp_targets, updated_center
from pretrain.dino.model import DinoModel, build_backbone, timm_kwargs
from pretrain.dino.monitor import knn_monitor
from pretrain.method import PretrainMethod, method_section
from pretrain.timm_weights import export_timm_backbone

TEACHER_BACKBONE = "teacher.backbone."
CENTERINGS = ("centering", "sinkhorn_knopp")


def unwrap(net: nn.Module) -> nn.Module:
    """The DinoModel inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`); FSDP2 is itself."""
    while not isinstance(net, DinoModel):
        inner = getattr(net, "module", None)
        if inner is None:
            inner = uncompiled(net)
        if not isinstance(inner, nn.Module):
            raise BatonError(f"expected the DINO model (or a wrapper of it), got {type(net).__name__}")
        net = inner
    return net


class DinoMethod(PretrainMethod):
    name = "dino"

    def __init__(self, cfg, info: DistInfo):
        super().__init__(cfg, info)
        self.dino = method_section(cfg, "dino", DinoConfig)
        if self.dino.centering not in CENTERINGS:
            raise unknown_name("dino.centering", self.dino.centering, CENTERINGS)
        self._monitor = None  # a KnnMonitor once evaluate has run, False when dino.knn_shards is unset

    def model_label(self) -> str:
        return self.dino.backbone

    # ------------------------------------------------------------ run geometry
    def grad_accum(self) -> int:
        train = getattr(self.cfg, "train", None)
        return max(1, int(getattr(train, "grad_accum", 1) or 1))

    def global_batch(self) -> int:
        """Samples per optimiser step over all ranks and micro-batches."""
        return self.cfg.data.batch_size * self.info.world_size * self.grad_accum()

    # ------------------------------------------------------------ contract
    def build_model(self) -> nn.Module:
        return DinoModel(self.dino)

    def sample_map(self, model) -> MultiCrop:
        crops = MultiCrop(self.dino, uint8=True)   # uint8 crops; place_normalization says who normalises them
        crops.row_normalize = self.place_normalization(crops.batch_normalize)
        return crops

    def param_groups(self, model) -> list[dict]:
        """The student's trainable parameters (utils.get_params_groups): no weight decay on biases
        and 1-D tensors (norms); the head's last layer in its own group, so it can be frozen."""
        groups: dict[str, list] = {"decay": [], "no_decay": [], "last_layer": []}
        for name, p in unwrap(model).student.named_parameters():
            if not p.requires_grad:
                continue
            if name.startswith("head.last_layer."):
                groups["last_layer"].append(p)
            elif name.endswith(".bias") or p.ndim == 1:
                groups["no_decay"].append(p)
            else:
                groups["decay"].append(p)
        wd = self.dino.weight_decay
        return [{"params": ps, "weight_decay": 0.0 if n == "no_decay" else wd, "name": n}
                for n, ps in groups.items() if ps]

    def lr_scale(self) -> float:
        """The linear scaling rule: lr x global batch / 256 (main_dino.py), when enabled."""
        return self.global_batch() / 256.0 if self.dino.scale_lr_by_batch else 1.0

    def adjust_optimizer(self, optimizer, step: int, total: int) -> None:
        """On the lrs the engine has just set (optim.lr x warm-up/cosine): the batch scaling, the
        weight-decay schedule on the decayed groups, lr 0 for the last layer while it is frozen."""
        wd = schedules.weight_decay(step, total, self.dino.weight_decay, self.dino.weight_decay_end)
        frozen = schedules.last_layer_frozen(step, self.steps_per_epoch(), self.dino.freeze_last_layer)
        scale = self.lr_scale()
        for group in optimizer.param_groups:
            group["lr"] *= scale
            name = group.get("name")
            if name in ("decay", "last_layer"):
                group["weight_decay"] = wd
            if name == "last_layer" and frozen:
                group["lr"] = 0.0

    def loss(self, net, batch: tuple, step: int, total: int) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The distillation loss (+ dino.koleo_loss_weight x KoLeo). With KoLeo the two parts are
        returned as detached 0-dim tensors, not floats: the engine reads them only on a logged step
        (train.log_every), so a step that is not logged waits for no GPU result."""
        crops = [t for t in batch if torch.is_tensor(t)]  # the loader's keys, if passed, are not tensors
        n_crops = 2 + self.dino.n_local_crops
        if len(crops) != n_crops:
            raise BatonError(f"DINO expects {n_crops} crops per sample (2 global + dino.n_local_crops="
                             f"{self.dino.n_local_crops}), the batch holds {len(crops)} tensors")
        koleo = self.dino.koleo_loss_weight > 0
        student_out, teacher_out, *feats = net(*crops, return_features=True) if koleo else net(*crops)
        model = unwrap(net)
        temp = schedules.teacher_temperature(step, self.steps_per_epoch(), self.dino.warmup_teacher_temp,
                                             self.dino.teacher_temp, self.dino.warmup_teacher_temp_epochs)
        extra: dict[str, float | torch.Tensor] = {}
        if self.dino.centering == "sinkhorn_knopp":
            targets = sinkhorn_knopp_targets(teacher_out, temp, self.dino.sinkhorn_iterations)
            loss = distillation_loss(student_out, targets, n_crops=n_crops, student_temp=self.dino.student_temp)
        else:
            loss = dino_loss(student_out, teacher_out, model.center, n_crops=n_crops, teacher_temp=temp,
                             student_temp=self.dino.student_temp)
            model.center.copy_(updated_center(model.center, teacher_out, self.dino.center_momentum))
        if koleo:
            reg = sum(koleo_loss(f) for f in feats[0].chunk(2))
            extra["dino_loss"], extra["koleo_loss"] = loss.detach(), reg.detach()   # fresh tensors: never updated in place
            loss = loss + self.dino.koleo_loss_weight * reg
        return loss, {**extra, "teacher_temp": temp,
                      "teacher_momentum": schedules.teacher_momentum(step, total, self.dino.teacher_momentum),
                      "weight_decay": schedules.weight_decay(step, total, self.dino.weight_decay,
                                                             self.dino.weight_decay_end)}

    def after_step(self, model, step: int, total: int) -> None:
        unwrap(model).update_teacher(schedules.teacher_momentum(step, total, self.dino.teacher_momentum))

    def shard_units(self, model) -> list[nn.Module]:
        """FSDP2 units: each backbone's blocks (ViT `blocks`, convnet `stages` / ResNet `layer1-4`)
        and both heads (the last layer is bottleneck x out_dim: 16.8 M parameters at 65536)."""
        units: list[nn.Module] = []
        for net in (unwrap(model).student, unwrap(model).teacher):
            bb = net.backbone
            if hasattr(bb, "blocks"):
                units += list(bb.blocks)
            elif hasattr(bb, "stages"):
                units += list(bb.stages)
            else:
                units += [getattr(bb, f"layer{i}") for i in range(1, 5) if hasattr(bb, f"layer{i}")]
            units.append(net.head)
        return units

    def preprocess(self) -> dict[str, Any]:
        return {"image_size": int(self.dino.global_crop_size), "mean": [float(m) for m in self.dino.mean],
                "std": [float(s) for s in self.dino.std], "interpolation": "bicubic"}

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """The TEACHER's backbone (the paper evaluates the teacher) as a timm handoff, which timm
        itself also loads (pretrain.timm_weights: timm's key names, its config.json beside them)."""
        weights = {k.split(TEACHER_BACKBONE, 1)[1]: v for k, v in state.items() if TEACHER_BACKBONE in k}
        if not weights:
            raise BatonError(f"the checkpoint holds no '{TEACHER_BACKBONE}*' weights: it is not a DINO run "
                             f"(keys look like {sorted(state)[:3]})")
        return export_timm_backbone(
            out, build_backbone(self.dino, weights=False), weights, f"dino.backbone={self.dino.backbone} {self.dino.backbone_kwargs}",
            architecture=self.dino.backbone, model_config=timm_kwargs(self.dino), preprocess=self.preprocess(),
            source={**self.source, "method": self.name, "weights": "teacher"})

    def evaluate(self, model, step: int) -> dict[str, float]:
        """Every train.eval_every steps: the weighted k-NN (k=dino.knn_k, T=dino.knn_temperature) of the
        TEACHER backbone on dino.knn_shards (`pretrain.dino.monitor`); nothing when that is unset.
        Called on every rank (it all-reduces the features)."""
        if self._monitor is None:
            self._monitor = knn_monitor(self.dino, self.info) or False   # dino.knn_max_skipped_fraction
        if not self._monitor:
            return {}
        return self._monitor(unwrap(model).teacher.backbone, self.info.device)
