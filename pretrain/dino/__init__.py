"""DINO self-distillation (Caron et al. 2021) as a pretraining method on the shared engine.

One concern per file: `config` (DinoConfig), `augment` (multi-crop SampleMap), `model` (DINO head,
multi-resolution student/teacher, centre buffer, EMA), `loss` (cross-entropy over view pairs +
centre update), `schedules` (pure functions of the step), `knn` (weighted k-NN monitor), `method`
(`DinoMethod`, the `PretrainMethod` contract the engine calls). Reference semantics:
facebookresearch/dino (main_dino.py, vision_transformer.py, utils.py, eval_knn.py).
"""

from pretrain.dino.config import DinoConfig

__all__ = ["DinoConfig"]
