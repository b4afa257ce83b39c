"""CLIP model building on top of open_clip (see `pretrain.clip.model`)."""
