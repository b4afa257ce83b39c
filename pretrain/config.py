"""The pretraining config: dataclasses that `baton.config.load_config` fills from YAML + overrides.

Every key has a default so a YAML file only states what differs; the fully resolved config is
written to `run_dir/config.yaml` and stored in each checkpoint.

These are the engine's keys. What is learned is the `method`, and each method owns its section,
spelled with its name: `method: clip` reads `clip:` (`pretrain/clip/config.py`), `method: dino`
reads `dino:` (`pretrain/dino/config.py`), `method: glip` reads `glip:` (`pretrain/glip/config.py`);
`pretrain/methods.py` registers each. A loaded config
is an instance of `baton.config.concrete_schema(PretrainConfig, method)`, which has that field;
`cfg.method_section` is it. Configs of the layout before (a top-level CLIP `model:` section and a
`dino:` section in every config) are still read: `model:` as `clip:` with a warning, and the
section the chosen method does not read left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from baton.config import ChosenSection, bounded
from baton.skips import MAX_SKIPPED_FRACTION
from pretrain.methods import method_sections


@dataclass
class DataConfig:
    # A directory of *.tar, one .tar, a brace pattern (dir/shard-{000000..000007}.tar) or an fsspec
    # URL; a URL ending in "/" is a shard directory whose stats.json lists the shards. Or a list of
    # such sources mixed with upsampling weights: [{url: ..., weight: 2.0}, ...] (Any: str or list).
    train_shards: Any = "data/emoji/train"
    # resampled: shards drawn with replacement, seeded per epoch (never runs dry);
    # epoch_exact: each shard once per epoch (x its weight), split by rank and by worker.
    mode: str = "resampled"
    num_samples: Optional[int] = bounded(None, ge=1)   # samples per epoch; None: sum of weight x samples from stats.json
    batch_size: int = bounded(64, gt=0)                # per rank
    workers: int = bounded(2, ge=0)                    # DataLoader worker processes per rank (0 = in-process)
    image_size: Optional[int] = bounded(None, ge=1)    # None: the model's image size
    shuffle_buffer: int = bounded(500, ge=0)           # samples held for shuffling inside each worker
    log_skipped_every_s: float = 60.0   # at most one log line per this many seconds about skipped samples
    # How workers hand images to the trainer: "uint8" (4x fewer bytes, normalised on the device),
    # "float" (normalised in the workers) or "auto": uint8 when training on a GPU, float on a CPU
    # (where the workers are the parallel part). Both give the same float32 images, bit for bit.
    image_handoff: str = "auto"
    # CLIP: hand the JPEG bytes to the training process, which decodes the batch on its device
    # (torchvision.io.decode_jpeg, nvJPEG on CUDA) and crops / resizes / normalises it there
    # (pretrain/data/device_decode.py): the same shapes, dtype and range as the workers' decoding,
    # without the CPU cores. JPEG shards only (others are skipped as not_jpeg). On a CPU run it
    # decodes in the training process on the CPU (for testing; slower than the workers).
    decode_on_device: bool = False
    # decode_on_device: the most bytes a JPEG may have (bigger ones are skipped as too_many_bytes);
    # null: 3 x image_size^2 (the uint8 image's size), at least 64 KiB.
    decode_max_bytes: Optional[int] = bounded(None, ge=1024)


@dataclass
class OptimConfig:
    lr: float = bounded(5e-4, gt=0)
    weight_decay: float = bounded(0.2, ge=0)           # not applied to norms, biases, embeddings, logit_scale
    betas: List[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = bounded(1e-6, gt=0)
    warmup_steps: int = bounded(100, ge=0)             # linear warm-up steps, then cosine decay to 0
    grad_clip: Optional[float] = bounded(1.0, gt=0)    # max global grad norm; null: off


@dataclass
class TrainConfig:
    epochs: int = bounded(1, ge=1)
    max_steps: Optional[int] = bounded(None, ge=1)     # caps epochs x steps_per_epoch (the schedule follows it)
    precision: str = "auto"             # auto | fp32 | bf16 | fp16 (auto: bf16 on capable CUDA; fp16 needs CUDA)
    # How the model is spread over ranks (pretrain/strategies/): ddp (replicated), fsdp (FSDP2
    # fully_shard: parameters, gradients and optimiser state sharded) or deepspeed (ZeRO `zero_stage`).
    strategy: str = "ddp"
    zero_stage: int = bounded(2, ge=1, le=3)                 # deepspeed only: 1 optimiser state, 2 + gradients, 3 + parameters
    offload: bool = False               # fsdp / deepspeed: keep sharded state (and ZeRO-3 parameters) in CPU memory
    # Extra DeepSpeed config entries merged over the ones baton derives (e.g. {zero_optimization:
    # {overlap_comm: true}}); checked by DeepSpeed's own config classes before any process starts.
    deepspeed: Any = None
    # Micro-batches of data.batch_size per optimiser step. CLIP computes its contrastive loss over all
    # of them (clip.accum_loss: full_batch, pretrain/clip/accumulation.py); DINO, GLIP accumulate plainly.
    grad_accum: int = bounded(1, ge=1)
    grad_checkpointing: bool = False    # recompute activations in backward (the model's set_grad_checkpointing)
    compile: bool = False               # torch.compile the model (nn.Module.compile, state-dict names unchanged)
    # 4-D weights and image batches in channels-last (NHWC) order: convnets run faster a step on CPU
    # (oneDNN) and GPU (cuDNN); the values, checkpoints and exports are the same (baton.run.to_channels_last)
    channels_last: bool = False
    eval_every: int = bounded(0, ge=0)                 # steps between method.evaluate calls, and at the end (0: never)
    checkpoint_every: int = bounded(500, ge=0)         # steps (0: every epoch, as in finetuning); also at the end
    keep_last: int = bounded(3, ge=0)                  # checkpoints kept (0 keeps all)
    log_every: int = bounded(10, ge=1)                 # steps between metrics.jsonl rows
    wandb_project: Optional[str] = None  # also log to Weights & Biases (needs `pip install wandb`)
    device: str = "auto"                # auto | cpu | cuda
    # torch intra-op threads in each training process (None: torch's default, one per core). On a
    # small CPU box shared with loader workers or other jobs, 1 avoids OpenMP oversubscription.
    threads: Optional[int] = bounded(None, ge=1)
    # Steps whose loss is not finite (on any rank) that may be skipped in the whole run, resumes
    # included (baton/nonfinite.py): 0 stops at the first, naming the last good checkpoint; N skips
    # up to N (nothing of such a step applied, its number logged and saved) and stops at one more.
    max_nonfinite_steps: int = bounded(0, ge=0)
    # Stop as if killed right after this global step (no extra checkpoint): lets tests and
    # time-boxed jobs interrupt deterministically, then continue with resume=latest.
    stop_after_steps: Optional[int] = bounded(None, ge=0)


@dataclass
class EvalConfig:
    """A held-out labelled set that a method monitors every `train.eval_every` steps (and at the end),
    kept here because several methods read one: `clip.eval` (zero-shot + image<->text retrieval,
    pretrain/clip/evaluation.py, with its own keys beside these) and `glip.eval` (grounding and
    detection, pretrain/glip/evaluation.py). Each method owns its copy: a key takes effect only where
    a method reads it."""
    # Held-out labelled shards, as data.train_shards (e.g. data/emoji/test); None: no evaluation.
    shards: Any = None
    # The first N samples in shard order that pass the checks needing no decoding (an undecodable
    # image among them is then left out and counted); None: all.
    max_samples: Optional[int] = bounded(5000, ge=1)
    batch_size: int = bounded(256, gt=0)               # images / captions / prompts embedded at a time, per rank
    # The share of the held-out samples (eval.shards) that may be skipped (bad
    # image or json, no caption) or lost (a truncated shard) before evaluation fails naming the
    # shards (the rule of finetuning's data.max_skipped_fraction, baton/skips.py); below it counted.
    max_skipped_fraction: float = bounded(MAX_SKIPPED_FRACTION, ge=0, le=1)


@dataclass
class PretrainConfig:
    # `method: NAME` types the section NAME: by the method's own dataclass. The old layout's
    # sections: `model:` was CLIP's, `dino:` DINO's.
    # `eval:`, `data.caption` and `data.augment` were engine keys that only some methods read; they
    # are the methods' own now (`clip.eval`, `clip.caption`, `clip.augment`, `glip.eval`,
    # `dino.knn_max_skipped_fraction`: each section's FROM_SHARED_KEYS).
    CHOSEN_SECTION: ClassVar[ChosenSection] = ChosenSection("method", method_sections,
                                                            old_sections={"model": "clip", "dino": "dino"},
                                                            moved_keys=("eval", "data.caption", "data.augment"))

    run_dir: str = "runs/pretrain"
    seed: int = 0
    resume: Optional[str] = None        # null: a fresh run (refuses a used run_dir) | latest | a checkpoint path
    # What is learned (pretrain/methods.py): clip | dino | glip; its keys are the section of the same name
    method: str = "clip"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def method_section(self) -> Any:
        """The chosen method's own config section (`cfg.clip` when method=clip, ...)."""
        return getattr(self, self.method)


def pretrain_config(method: str = "clip", **values: Any) -> PretrainConfig:
    """A PretrainConfig for `method` built in code, e.g. pretrain_config(clip=ClipConfig(name=...))."""
    from baton.config import concrete_config

    return concrete_config(PretrainConfig, method, **values)
