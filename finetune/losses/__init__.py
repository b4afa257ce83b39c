"""DML losses and miners, by class name with their own arguments (finetune/losses/registry.py).

Every loss is built as `build_loss(name, num_classes, embedding_dim, kwargs, miner, miner_kwargs)`
and called as `loss(embeddings, labels)`. SoftTriple is ours (its own file: it has the centre
regulariser tau); every other loss and every miner is pytorch-metric-learning's class, unchanged,
so comparisons with them use the reference implementations, run with pml's defaults for what the
config does not set (MultiSimilarityLoss: alpha 2, beta 50, base 0.5 -- the paper's beta is 40,
which a recipe must set). Losses with parameters (SoftTriple's centres, pml's proxies, a learnt
margin beta) are optimised at `optim.loss_lr`. Language guidance (language_guidance.py) is added
on top of any of these by the training loop.
"""

from __future__ import annotations

from finetune.losses.language_guidance import LanguageGuidance
from finetune.losses.registry import (LOSS_ALIASES, MINER_ALIASES, MinedLoss, build_loss, check_loss_and_miner,
                                      constructor_args, loss_class, miner_class, pml_losses, pml_miners)
from finetune.losses.softtriple import SoftTriple

__all__ = ["LOSS_ALIASES", "MINER_ALIASES", "LanguageGuidance", "MinedLoss", "SoftTriple", "build_loss",
           "check_loss_and_miner", "constructor_args", "loss_class", "miner_class", "pml_losses", "pml_miners"]
