"""`GlipMethod`: grounded language-image pretraining on the generic engine (the `PretrainMethod` contract).

The engine owns the loop, strategies, checkpoints and loader; this class says what GLIP trains
(`pretrain.glip.model.GlipModel`), how a grounding sample becomes tensors
(`pretrain.glip.data.GroundingSample`) and the loss (`pretrain.glip.loss.glip_loss`). The loss
normalisers (positive locations, centerness sum) are averaged over ranks, so N DDP ranks train
like one process on the N x larger batch. Weight decay skips biases, norms, gains, embeddings and
the alignment scale/bias (as CLIP's rule).

The handoff is the image backbone, a timm model, written as DINO writes its teacher (timm's key
names, timm's config.json beside them): finetuning and timm's `local-dir:` load it unchanged.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from baton.compat import uncompiled
from baton.distributed import all_reduce
from baton.errors import BatonError
from pretrain.glip.config import GlipConfig
from pretrain.glip.data import GroundingSample
from pretrain.glip.loss import glip_loss
from pretrain.glip.model import BiCrossAttention, GlipModel, backbone_kwargs, build_backbone, build_tokenizer
from pretrain.method import PretrainMethod, method_section
from pretrain.timm_weights import export_timm_backbone, start_weights

BACKBONE = "backbone."
NO_DECAY = ("bias", "norm", "ln_", "embedding", "gain_", "logit_scale", "bias0")


def unwrap(net: nn.Module) -> GlipModel:
    """The GlipModel inside DDP / DeepSpeed (`.module`) or torch.compile (`._orig_mod`)."""
    while not isinstance(net, GlipModel):
        inner = getattr(net, "module", None) or uncompiled(net)
        if not isinstance(inner, nn.Module):
            raise BatonError(f"expected the GLIP model (or a wrapper of it), got {type(net).__name__}")
        net = inner
    return net


class GlipMethod(PretrainMethod):
    name = "glip"

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        self.glip = method_section(cfg, "glip", GlipConfig)
        self._tokenizer = None
        self._evaluator = None
        # True when a checkpoint fills every weight next (`baton ground`): build_model then reads no
        # starting weights (glip.init_from, glip.pretrained), which need not exist any more
        self.from_checkpoint = False

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tokenizer(self.glip)
        return self._tokenizer

    # ------------------------------------------------------------ contract
    def build_model(self) -> nn.Module:
        from pretrain.glip.init_from import check_towers, init_from_handoff

        check_towers(self.glip.init_towers)
        chosen = {"pretrained": False} if self.from_checkpoint else \
            start_weights("glip", self.glip.pretrained, self.glip.backbone_kwargs)
        if chosen["pretrained"] and self.glip.init_from and "image" in self.glip.init_towers:
            keys = (f"glip.pretrained={self.glip.pretrained!r}" if self.glip.pretrained else
                    f"glip.backbone_kwargs {sorted(k for k in chosen if k != 'pretrained') or ['pretrained']}")
            raise BatonError(f"{keys} and glip.init_from={self.glip.init_from} (init_towers "
                             f"{list(self.glip.init_towers)}) both choose the image backbone's starting weights: "
                             f"keep one, or set glip.init_towers=[text]")
        held = [k for k, on in (("glip.freeze_batchnorm", self.glip.freeze_batchnorm),
                                ("glip.backbone_lr_factor", self.glip.backbone_lr_factor != 1.0)) if on]
        if held and not self.from_checkpoint and not chosen["pretrained"] and \
                not (self.glip.init_from and "image" in self.glip.init_towers):
            logging.getLogger("baton").warning(
                "%s hold back a backbone that starts from a random init (BatchNorm statistics 0 / 1, a "
                "slower lr): they are GLIP's recipe for a pretrained one (glip.init_from, glip.pretrained)",
                " and ".join(held))
        tok = self.tokenizer()
        model = GlipModel(self.glip, vocab_size=len(tok), pad_id=int(tok.pad_token_id or 0),
                          start_weights=not self.from_checkpoint)
        if self.glip.init_from and not self.from_checkpoint:
            init_from_handoff(model, self.glip)
        return model

    def sample_map(self, model) -> GroundingSample:
        samples = GroundingSample(self.glip, self.tokenizer())
        samples.row_normalize = self.place_normalization(samples.batch_normalize)
        return samples

    def param_groups(self, model) -> list[dict]:
        """The decay / no-decay groups; with glip.backbone_lr_factor != 1 each splits in two, the
        backbone's parameters (named `backbone.*`) in groups that carry that `lr_factor`."""
        groups = self.decay_groups(model, NO_DECAY)
        factor = self.glip.backbone_lr_factor
        if factor == 1.0:
            return groups
        backbone = {id(p) for p in unwrap(model).backbone.parameters()}
        split = []
        for g in groups:
            for in_backbone in (False, True):
                params = [p for p in g["params"] if (id(p) in backbone) == in_backbone]
                if params:
                    split.append({**g, "params": params, "name": g["name"] + ("_backbone" if in_backbone else ""),
                                  **({"lr_factor": factor} if in_backbone else {})})
        return split

    def adjust_optimizer(self, optimizer, step: int, total: int) -> None:
        """The backbone's groups learn at the engine's lr x glip.backbone_lr_factor."""
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_factor", 1.0)

    def reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """A loss normaliser averaged over ranks (GLIP's reduce_sum / world size)."""
        if self.info.world_size == 1:
            return t
        return all_reduce(t.clone(), "mean")

    def loss(self, net, batch: tuple, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        tensors = [t for t in batch if torch.is_tensor(t)]
        if len(tensors) != 6:
            raise BatonError(f"GLIP expects 6 tensors per batch (image, ids, mask, boxes, valid, positive map), "
                             f"got {len(tensors)}: are data.train_shards grounding shards?")
        images, ids, mask, boxes, valid, positive = tensors
        out = net(images, ids, mask)
        return glip_loss(out, boxes, valid, positive, mask, self.glip, self.reduce_mean)

    def shard_units(self, model) -> list[nn.Module]:
        """FSDP2 units: the fusion layers, the text transformer's blocks and the backbone's stages."""
        m = unwrap(model)
        units: list[nn.Module] = [mod for mod in m.modules() if isinstance(mod, BiCrossAttention)]
        resblocks = getattr(getattr(m.text.net, "transformer", None), "resblocks", None)
        units += list(resblocks or [])
        for attr in ("stages", "blocks"):
            if isinstance(getattr(m.backbone, attr, None), nn.Sequential):
                units += list(getattr(m.backbone, attr))
        return units

    def preprocess(self) -> dict[str, Any]:
        return {"image_size": int(self.glip.image_size), "mean": [float(v) for v in self.glip.mean],
                "std": [float(v) for v in self.glip.std], "interpolation": "bilinear"}

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        """The image backbone as a timm handoff (pooled features: timm's num_classes=0 head)."""
        weights = {k[len(BACKBONE):]: v for k, v in state.items() if k.startswith(BACKBONE)}
        if not weights:
            raise BatonError(f"the checkpoint holds no '{BACKBONE}*' weights: it is not a GLIP run "
                             f"(keys look like {sorted(state)[:3]})")
        return export_timm_backbone(
            out, build_backbone(self.glip, weights=False), weights,   # the checkpoint's weights, not glip.pretrained's
            f"glip.backbone={self.glip.backbone} {self.glip.backbone_kwargs}",
            architecture=self.glip.backbone, model_config=backbone_kwargs(self.glip),
            preprocess=self.preprocess(), source={**self.source, "method": self.name})

    def evaluate(self, model, step: int) -> dict[str, float]:
        """Grounding Recall@1 and @5 (IoU >= 0.5) and zero-shot detection mAP on `glip.eval.shards`
        (pretrain/glip/evaluation.py); on every rank (the counts and the metric are reduced)."""
        if not self.glip.eval.shards:
            return {}
        from pretrain.glip.evaluation import evaluate_glip

        m = unwrap(model)
        was = m.training
        m.eval()
        try:
            return evaluate_glip(m, self, self.info.device)
        finally:
            m.train(was)
