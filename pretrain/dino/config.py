"""`DinoConfig`: the DINO method's own config section (`dino:` in a recipe with `method: dino`,
registered with the method in `pretrain/methods.py`).

Defaults are the reference ViT-S/16 recipe of facebookresearch/dino (main_dino.py's arguments);
the demo shrinks crop sizes, backbone and head through YAML (`configs/dino_demo.yaml`). The
engine's own keys keep their meaning: `optim.lr` is the peak learning rate (times
global batch / 256 when `scale_lr_by_batch`), `optim.warmup_steps` its linear warm-up,
`optim.grad_clip` the gradient clipping (the reference uses 3.0); `optim.weight_decay` is replaced
by the cosine weight-decay schedule below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional

from baton.config import bounded
from baton.skips import MAX_SKIPPED_FRACTION

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class DinoConfig:
    # of the engine's `eval:` keys, DINO read only max_skipped_fraction (for knn_shards)
    FROM_SHARED_KEYS: ClassVar[dict] = {"eval.max_skipped_fraction": "dino.knn_max_skipped_fraction"}
    """DINO's backbone, head, multi-crop, loss, schedules and k-NN monitor (facebookresearch/dino)."""
    # --- backbone: any timm model, built with num_classes=0 (pooled features, no classifier)
    backbone: str = "vit_small_patch16_224"
    # Extra `timm.create_model` kwargs, e.g. a tiny ViT: {img_size: 64, patch_size: 8, embed_dim: 192,
    # depth: 6, num_heads: 3, dynamic_img_size: true}. A ViT needs dynamic_img_size: true when the
    # local crops are smaller than the global ones (its position embedding is then interpolated).
    # A free mapping (its keys are timm's, not ours): `dino.backbone_kwargs.KEY=VALUE` adds one.
    backbone_kwargs: Optional[Dict[str, Any]] = field(default_factory=dict)
    # The backbone's starting weights (student and teacher): null (random init) | timm (timm's released
    # weights of dino.backbone, e.g. vit_small_patch16_224.dino; offline: the cache to fill) | a weights
    # file timm loads (.safetensors / .pth, e.g. a baton timm export's backbone.safetensors)
    pretrained: Optional[str] = None
    drop_path_rate: float = bounded(0.1, ge=0, le=1)          # stochastic depth, student only (the teacher has none)
    # --- DINO head: MLP (GELU) -> bottleneck -> L2 norm -> weight-normalised linear to out_dim
    out_dim: int = bounded(65536, ge=1)
    hidden_dim: int = bounded(2048, ge=1)
    bottleneck_dim: int = bounded(256, ge=1)
    head_layers: int = bounded(3, ge=1)
    norm_last_layer: bool = True         # the last layer's weight-norm gain fixed at 1 (stabler)
    # --- multi-crop augmentation
    global_crop_size: int = bounded(224, ge=1)
    global_crop_scale: List[float] = field(default_factory=lambda: [0.4, 1.0])
    local_crop_size: int = bounded(96, ge=1)
    local_crop_scale: List[float] = field(default_factory=lambda: [0.05, 0.4])
    n_local_crops: int = bounded(8, ge=0)
    color_jitter: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # b, c, s, hue
    color_jitter_prob: float = bounded(0.8, ge=0, le=1)
    gray_scale_prob: float = bounded(0.2, ge=0, le=1)
    blur_prob: List[float] = field(default_factory=lambda: [1.0, 0.1, 0.5])  # global 1, global 2, locals
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])     # pixels
    solarize_prob: float = bounded(0.2, ge=0, le=1)           # second global crop only
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    # --- loss
    student_temp: float = bounded(0.1, gt=0)
    warmup_teacher_temp: float = bounded(0.04, gt=0)    # teacher temperature at epoch 0 ...
    teacher_temp: float = bounded(0.04, gt=0)           # ... rising linearly to this over warmup_teacher_temp_epochs
    warmup_teacher_temp_epochs: int = bounded(0, ge=0)
    center_momentum: float = bounded(0.9, ge=0, le=1)
    # The teacher's targets: "centering" (DINO: softmax of (t - centre) / temp, the centre an EMA of the
    # batch mean) or "sinkhorn_knopp" (DINOv2: the softmax rebalanced over the global batch so every
    # prototype gets the same mass, `sinkhorn_iterations` times; no centre). The latter does not
    # collapse at the demo's small scale, where the centred softmax goes uniform (BENCHMARKS.md).
    centering: str = "centering"
    sinkhorn_iterations: int = bounded(3, ge=1)
    # DINOv2's KoLeo regulariser on the student's backbone features of each global crop (its weight;
    # DINOv2 uses 0.1; 0: off): spreads the features, against collapse onto a few directions.
    koleo_loss_weight: float = bounded(0.0, ge=0)
    # --- schedules (cosine over the whole run)
    teacher_momentum: float = bounded(0.996, ge=0, le=1)      # EMA momentum, cosine to 1
    weight_decay: float = bounded(0.04, ge=0)           # cosine to weight_decay_end (biases and norms: none)
    weight_decay_end: float = bounded(0.4, ge=0)
    freeze_last_layer: int = bounded(1, ge=0)           # epochs during which the head's last layer is not updated
    scale_lr_by_batch: bool = True       # lr = optim.lr x global batch / 256 (linear scaling rule)
    # --- k-NN monitor (eval_knn.py), every train.eval_every steps: the teacher backbone's weighted
    # k-NN on held-out labelled shards (pretrain/dino/monitor.py), each class split in memory/query
    # halves. knn_shards as data.train_shards (e.g. data/emoji/test); None: no monitoring.
    knn_shards: Any = None
    knn_max_samples: Optional[int] = bounded(2000, ge=1)  # the first N usable samples in shard order; None: all
    knn_batch_size: int = bounded(256, ge=1)              # images embedded at a time, per rank
    knn_k: int = bounded(20, ge=1)
    knn_temperature: float = bounded(0.07, gt=0)
    # the share of knn_shards' samples that may be skipped (bad image or json) or lost (a truncated
    # shard) before the monitor fails naming the shards (baton/skips.py); below it counted
    knn_max_skipped_fraction: float = bounded(MAX_SKIPPED_FRACTION, ge=0, le=1)
