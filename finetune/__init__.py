"""Deep metric learning on a pretrained backbone, and retrieval evaluation on held-out classes."""
