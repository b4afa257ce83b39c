"""pretrain: CLIP pretraining on WebDataset shards, and export of the image backbone.

`baton pretrain CONFIG [key=value ...]` runs `pretrain.train.main`; `baton export CHECKPOINT OUT`
runs `pretrain.export.main`. `pretrain.backbones` rebuilds an exported backbone for later stages.
"""
