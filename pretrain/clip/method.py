"""CLIP as a pretraining method: open_clip's model and ClipLoss behind the `PretrainMethod` contract.

The loss is open_clip's `ClipLoss(local_loss=True, gather_with_grad=True)`: each rank scores its
own B images against all N*B gathered texts (and vice versa), so logit memory grows with the local
batch, and gradients flow through the gather, so N ranks x B samples give exactly the gradients of
one N*B batch. With `train.grad_accum` = K the loss is that of the whole accumulated batch (K*N*B
pairs; pretrain/clip/accumulation.py), unless `clip.accum_loss: micro_batch`. Weight decay skips gains, biases, embeddings and the logit scale (open_clip_train's
rule), and the learned temperature is clamped to [0, ln 100] after every step, as CLIP does.

The handoff is the image tower (`backbone.safetensors`, open_clip's `visual.*` names without the
prefix) plus the text tower (`text_tower.safetensors`: every other weight, logit_scale included),
so finetuning can embed class names with the very text encoder the image tower was aligned to.
Beside them, open_clip's own `local-dir:` layout of the whole CLIP (`pretrain.clip.open_clip_weights`),
so open_clip users load the export with `open_clip.create_model_and_transforms('local-dir:OUT')`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from baton.errors import BatonError
from baton.handoff import BackboneMeta, TextTower, write_handoff, write_text_tower
from baton.registry import unknown_name
from pretrain.clip.open_clip_weights import check_clip_start, write_open_clip_dir
from pretrain.clip.model import (MAX_LOGIT_SCALE, build_clip, build_tokenizer, build_transforms, clamp_logit_scale,
                                 model_config_dict, preprocess_cfg)
from pretrain.data import SampleToPair
from pretrain.data.uint8_images import split_normalize
from pretrain.method import PretrainMethod

ACCUM_LOSSES = ("full_batch", "micro_batch")   # clip.accum_loss
# Parameter names (substrings) that get no weight decay besides every tensor of fewer than 2 dims.
NO_DECAY = ("bias", "ln", "norm", "embedding", "logit_scale")


class ClipMethod(PretrainMethod):
    name = "clip"
    decodes_on_device = True

    def __init__(self, cfg, info):
        super().__init__(cfg, info)
        if cfg.clip.accum_loss not in ACCUM_LOSSES:
            raise unknown_name("clip.accum_loss", cfg.clip.accum_loss, ACCUM_LOSSES)
        self._loss_fn = None
        self._eval_tools = None
        self._device_images = None   # data.decode_on_device: set by sample_map

    # ------------------------------------------------------------------ model and data
    def build_model(self) -> nn.Module:
        if self.cfg.clip.config is None:   # a named / local-dir: / hf-hub: model: its weights must be there
            check_clip_start(self.cfg.clip.name, self.cfg.clip.pretrained)
        model = build_clip(self.cfg.clip)
        size = preprocess_cfg(model)["image_size"]
        if self.cfg.data.image_size not in (None, size):
            raise BatonError(f"data.image_size={self.cfg.data.image_size} but the model takes {size} px; "
                             f"unset data.image_size or change the model's vision_cfg.image_size")
        return model

    def sample_map(self, model: nn.Module) -> SampleToPair:
        train_transform = build_transforms(preprocess_cfg(model), self.cfg.clip.augment)[0]
        if self.cfg.data.decode_on_device:   # JPEG bytes to the training process (pretrain/data/device_decode.py)
            from pretrain.data.device_decode import DeviceImages, EncodedJpegToPair, max_encoded_bytes

            _, self.batch_normalize = split_normalize(train_transform)   # on the device, after decoding
            self._device_images = DeviceImages(train_transform, self.info.device)
            size = preprocess_cfg(model)["image_size"]
            return EncodedJpegToPair(build_tokenizer(self.cfg.clip), self.cfg.clip.caption,
                                     max_encoded_bytes(self.cfg.data.decode_max_bytes, size))
        # The transform stops at a uint8 tensor; place_normalization says who normalises it.
        transform, normalize = split_normalize(train_transform)
        return SampleToPair(transform, build_tokenizer(self.cfg.clip), self.cfg.clip.caption,
                            row_normalize=self.place_normalization(normalize))

    def from_loader(self, batch: tuple, keys: list[str]) -> tuple:
        """data.decode_on_device: (JPEG bytes, lengths, seeds, tokens) -> (uint8 images on the device, tokens)."""
        if self._device_images is None:
            return batch
        return self._device_images(batch, keys)

    def param_groups(self, model: nn.Module) -> list[dict]:
        return self.decay_groups(model, NO_DECAY)

    def shard_units(self, model: nn.Module) -> list[nn.Module]:
        """The residual attention blocks of both towers (timm trunks: their blocks/stages)."""
        from open_clip.transformer import ResidualAttentionBlock

        units = [m for m in model.modules() if isinstance(m, ResidualAttentionBlock)]
        trunk = getattr(model.visual, "trunk", None)  # a timm image tower
        for attr in ("blocks", "stages"):
            if trunk is not None and isinstance(getattr(trunk, attr, None), nn.Sequential):
                units += list(getattr(trunk, attr))
        return units

    # ------------------------------------------------------------------ training
    def loss_fn(self) -> nn.Module:
        if self._loss_fn is None:
            import open_clip

            self._loss_fn = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True,
                                               rank=self.info.rank, world_size=self.info.world_size)
        return self._loss_fn

    def features(self, net: nn.Module, batch: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image features, text features, logit scale) of a batch of (images, tokens) through `net`."""
        images, texts = batch
        out = net(images, texts)
        # The clamp after each step keeps the parameter <= ln 100; under DeepSpeed the step writes its fp32
        # master copy back over it, so the temperature is also capped here (a no-op everywhere else).
        return out["image_features"], out["text_features"], out["logit_scale"].clamp(max=math.exp(MAX_LOGIT_SCALE))

    def loss(self, net: nn.Module, batch: tuple, step: int, total: int) -> tuple[torch.Tensor, dict[str, float]]:
        image, text, scale = self.features(net, batch)
        return self.loss_fn()(image, text, scale), {"logit_scale": scale.detach().float()}

    def accumulate(self, net, strategy, micro_batches, step: int, total: int):
        """train.grad_accum > 1: the contrastive loss over all the step's micro-batches
        (`clip.accum_loss: full_batch`, pretrain/clip/accumulation.py) or plain accumulation of
        each micro-batch's own loss (`micro_batch`)."""
        if self.cfg.train.grad_accum > 1 and self.cfg.clip.accum_loss == "full_batch":
            from pretrain.clip.accumulation import full_batch_step

            return full_batch_step(self, net, strategy, micro_batches, step, total)
        return super().accumulate(net, strategy, micro_batches, step, total)

    def after_step(self, model: nn.Module, step: int, total: int) -> None:
        clamp_logit_scale(model)

    # ------------------------------------------------------------------ handoff
    def model_label(self) -> str:
        return self.cfg.clip.name

    def export(self, state: dict[str, torch.Tensor], out: Path) -> Path:
        cfg = self.cfg
        model_config = model_config_dict(cfg.clip)
        tag = cfg.clip.pretrained
        model = build_clip(cfg.clip, weights=False)   # no download: the checkpoint's weights go in
        model.load_state_dict(state, strict=True)
        preprocess = preprocess_cfg(model)
        if tag:  # training used the pretrained tag's normalisation
            import open_clip
            tag_cfg = open_clip.get_pretrained_cfg(cfg.clip.name, tag) or {}
            preprocess.update({k: list(tag_cfg[k]) for k in ("mean", "std") if k in tag_cfg})
            preprocess["interpolation"] = tag_cfg.get("interpolation", preprocess["interpolation"])
        meta = BackboneMeta(
            library="open_clip", architecture=cfg.clip.name, model_config=model_config, tower="visual",
            embedding_dim=int(model_config["embed_dim"]), preprocess=preprocess,
            source={**self.source, "method": self.name}, text=export_text_tower(Path(out), model, model_config),
            extra={"open_clip": write_open_clip_dir(out, model, model_config, preprocess)})
        return write_handoff(out, model.visual.state_dict(), meta)

    def evaluate(self, model: nn.Module, step: int) -> dict[str, float]:
        """Zero-shot top-1/5 and image<->text Recall@1/5 on `clip.eval.shards` (pretrain/clip/evaluation.py)."""
        if not self.cfg.clip.eval.shards:
            return {}
        from pretrain.clip.evaluation import evaluate_clip

        if self._eval_tools is None:  # built once: the eval transform (resize, no augmentation) and tokenizer
            self._eval_tools = (build_transforms(preprocess_cfg(model), self.cfg.clip.augment)[1],
                                build_tokenizer(self.cfg.clip))
        was_training = model.training
        model.eval()
        try:
            return evaluate_clip(model, self.cfg.clip.eval, self.info, *self._eval_tools)
        finally:
            model.train(was_training)


def export_text_tower(out: Path, model: nn.Module, model_config: dict) -> TextTower:
    """Write the non-visual weights (logit_scale included) as the handoff's text tower."""
    text_cfg = model_config.get("text_cfg", {})
    return write_text_tower(out, {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")},
                            tokenizer=text_cfg.get("hf_tokenizer_name") or "open_clip-simple",
                            context_length=int(text_cfg.get("context_length", 77)))
