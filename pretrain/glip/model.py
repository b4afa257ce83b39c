"""GLIP's network, small and built from libraries: timm image backbone, text encoder, X-MHA fusion, dense head.

`GlipModel(images, input_ids, attention_mask)` returns, for every location of the backbone's
last feature map (one level, stride = image size / map size):

- `logits` (B, N, L): the region-word alignment scores, cosine(region feature, token feature) x a
  learned scale + a per-token bias + a constant bias initialised at the prior probability (GLIP's
  `bias_lang` . token + `bias0`), so that at the start every location scores every token ~prior;
- `ltrb` (B, N, 4): distances in pixels from the location to its box's left, top, right, bottom
  (softplus x stride: positive and smooth, where FCOS uses exp or ReLU);
- `centerness` (B, N): FCOS's centerness logit;
- `locations` (N, 2): the pixel (x, y) of each location (cell centres).

Why this shape: GLIP is a one-stage (ATSS/FCOS) detector whose classification layer is replaced by
the dot product with the prompt's token features, and whose image and text features have been
fused by cross-attention both ways before that (the "deep fusion" that makes the image features
prompt-aware). Here fusion is `torch.nn.MultiheadAttention` in both directions per layer, the
text encoder is an open_clip `TextTransformer` (or a transformers model) giving per-token
features, and the backbone is any timm model's `forward_features` map, so the image backbone is
exactly the module the handoff exports (`GlipMethod.export`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from baton.errors import BatonError
from baton.packaged_models import resolve_model_path
from baton.registry import Registry
from pretrain.backbones import keep_batchnorm_statistics
from pretrain.glip.config import GlipConfig
from pretrain.timm_weights import architecture_kwargs, create_backbone


def backbone_kwargs(cfg: GlipConfig) -> dict[str, Any]:
    """The `timm.create_model` kwargs of the image backbone's architecture (also the handoff's
    model_config: the starting weights are not part of it)."""
    return architecture_kwargs("glip", cfg.backbone, cfg.backbone_kwargs)


def build_backbone(cfg: GlipConfig, weights: bool = True) -> nn.Module:
    """The timm image backbone with glip.pretrained's starting weights (random when not `weights`:
    a module a checkpoint or an export fills)."""
    return create_backbone("glip", cfg.backbone, cfg.backbone_kwargs, cfg.pretrained, weights=weights)


def build_tokenizer(cfg: GlipConfig):
    """The fast HF tokenizer of `glip.text_model` (offsets map character spans to tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(cfg.text_model))
    if not getattr(tok, "is_fast", False):
        raise BatonError(f"glip.text_model={cfg.text_model}: its tokenizer is not a fast one, and grounding "
                         f"needs the offset mapping from characters to tokens that only fast tokenizers give")
    return tok


def _open_clip_text(cfg: GlipConfig, vocab_size: int, pad_id: int) -> tuple[nn.Module, int]:
    """open_clip's TextTransformer, bidirectional (no causal mask) with padding masked: every token
    sees the whole caption."""
    from open_clip.transformer import TextTransformer

    net = TextTransformer(context_length=cfg.max_tokens, vocab_size=vocab_size, width=cfg.text_width,
                          heads=cfg.text_heads, layers=cfg.text_layers, output_dim=None,
                          no_causal_mask=True, use_pad_mask=True, pad_id=pad_id, pool_type="first",
                          output_tokens=True)
    return net, cfg.text_width


def _hf_text(cfg: GlipConfig, vocab_size: int, pad_id: int) -> tuple[nn.Module, int]:
    """The transformers model `glip.text_model` (its own vocabulary and padding)."""
    from transformers import AutoModel

    net = AutoModel.from_pretrained(resolve_model_path(cfg.text_model))
    return net, int(net.config.hidden_size)


# glip.text_encoder -> builder(cfg, vocab_size, pad_id) -> (module, token feature width)
TEXT_ENCODERS = Registry("glip.text_encoder", {"open_clip": _open_clip_text, "hf": _hf_text})


class TextEncoder(nn.Module):
    """Token ids (B, L) + attention mask -> per-token features (B, L, width)."""

    def __init__(self, cfg: GlipConfig, vocab_size: int, pad_id: int):
        super().__init__()
        self.kind = cfg.text_encoder
        self.net, self.width = TEXT_ENCODERS[self.kind](cfg, vocab_size, pad_id)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "open_clip":
            return self.net(input_ids)[1]
        return self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class BiCrossAttention(nn.Module):
    """One X-MHA layer: image locations attend to tokens and tokens to locations, each a pre-norm
    residual update with a small learned gain (GLIP starts fusion near the identity)."""

    def __init__(self, dim: int, heads: int, init_gain: float = 0.1):
        super().__init__()
        self.norm_image, self.norm_text = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.image_from_text = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.text_from_image = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.gain_image = nn.Parameter(torch.full((dim,), init_gain))
        self.gain_text = nn.Parameter(torch.full((dim,), init_gain))

    def forward(self, image: torch.Tensor, text: torch.Tensor, text_padding: torch.Tensor):
        v, t = self.norm_image(image), self.norm_text(text)
        dv = self.image_from_text(v, t, t, key_padding_mask=text_padding, need_weights=False)[0]
        dt = self.text_from_image(t, v, v, need_weights=False)[0]
        return image + self.gain_image * dv, text + self.gain_text * dt


def conv_tower(dim: int, n: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(n):
        layers += [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(math.gcd(32, dim), dim), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class GlipModel(nn.Module):
    def __init__(self, cfg: GlipConfig, vocab_size: int, pad_id: int, start_weights: bool = True):
        """`start_weights=False`: the backbone is not given glip.pretrained's weights (the caller
        loads a checkpoint next, and the weights file may be gone by then)."""
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg, weights=start_weights)
        channels, self.grid = self._probe_map()
        self.text = TextEncoder(cfg, vocab_size, pad_id)
        self.image_in = nn.Conv2d(channels, cfg.dim, 1)
        self.text_in = nn.Linear(self.text.width, cfg.dim)
        self.fusion = nn.ModuleList(BiCrossAttention(cfg.dim, cfg.fusion_heads) for _ in range(cfg.fusion_layers))
        self.cls_tower, self.box_tower = conv_tower(cfg.dim, cfg.head_convs), conv_tower(cfg.dim, cfg.head_convs)
        self.region_proj = nn.Conv2d(cfg.dim, cfg.dim, 1)
        self.token_proj = nn.Linear(cfg.dim, cfg.dim)
        self.token_bias = nn.Linear(cfg.dim, 1)
        self.bias0 = nn.Parameter(torch.tensor(-math.log((1 - cfg.prior_prob) / cfg.prior_prob)))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.box_pred = nn.Conv2d(cfg.dim, 4, 3, padding=1)
        self.centerness_pred = nn.Conv2d(cfg.dim, 1, 3, padding=1)
        nn.init.zeros_(self.token_bias.weight)
        nn.init.zeros_(self.token_bias.bias)
        if cfg.lock_text:   # frozen; starting weights loaded later (init_from, a checkpoint) still fill it
            self.text.requires_grad_(False).eval()
        if cfg.freeze_batchnorm:   # from the first step: a model is built in training mode
            keep_batchnorm_statistics(self.backbone)

    def train(self, mode: bool = True) -> "GlipModel":
        """glip.lock_text: the text encoder stays in eval mode (no dropout) whatever the model's mode;
        glip.freeze_batchnorm: so do the backbone's BatchNorm layers (their statistics)."""
        super().train(mode)
        if self.cfg.lock_text:
            self.text.eval()
        if self.cfg.freeze_batchnorm:
            keep_batchnorm_statistics(self.backbone)
        return self

    @torch.no_grad()
    def _probe_map(self) -> tuple[int, tuple[int, int]]:
        """Channels and (h, w) of the backbone's map at glip.image_size (one zero image, eval mode:
        no normalisation statistics move, no random numbers are drawn)."""
        was = self.backbone.training
        self.backbone.eval()
        fmap = self.backbone.forward_features(torch.zeros(1, 3, self.cfg.image_size, self.cfg.image_size))
        self.backbone.train(was)
        if fmap.ndim != 4:
            raise BatonError(f"glip.backbone={self.cfg.backbone}: forward_features gives a {tuple(fmap.shape)} "
                             f"tensor, not a (B, C, H, W) feature map; use a convolutional timm model")
        return int(fmap.shape[1]), (int(fmap.shape[2]), int(fmap.shape[3]))

    def locations(self, h: int, w: int, device) -> tuple[torch.Tensor, float]:
        """Cell centres (N, 2) in pixels of an h x w map over the image, and the stride."""
        stride = self.cfg.image_size / w
        ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        return torch.stack([(xs.flatten() + 0.5) * stride, (ys.flatten() + 0.5) * stride], 1).float(), stride

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        fmap = self.image_in(self.backbone.forward_features(images))
        b, d, h, w = fmap.shape
        image = fmap.flatten(2).transpose(1, 2)                       # (B, N, D)
        text = self.text_in(self.text(input_ids, attention_mask))     # (B, L, D)
        padding = attention_mask == 0
        for layer in self.fusion:
            image, text = layer(image, text, padding)
        fused = image.transpose(1, 2).reshape(b, d, h, w)
        cls, box = self.cls_tower(fused), self.box_tower(fused)
        regions = F.normalize(self.region_proj(cls).flatten(2).transpose(1, 2), dim=-1)
        tokens = F.normalize(self.token_proj(text), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100.0)
        logits = scale * regions @ tokens.transpose(1, 2) + self.token_bias(text).transpose(1, 2) + self.bias0
        locations, stride = self.locations(h, w, images.device)
        return {"logits": logits, "ltrb": F.softplus(self.box_pred(box).flatten(2).transpose(1, 2)) * stride,
                "centerness": self.centerness_pred(box).flatten(1), "locations": locations, "stride": stride}
