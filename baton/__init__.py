"""baton: vision-language pretraining handed off to deep metric learning.

This package is the shared runtime every stage uses: the CLI, typed configs, distributed
initialisation, atomic checkpoint I/O, logging and the handoff format. Stages (`data_prep`,
`pretrain`, `finetune`) import from here; this package imports stages only lazily, from the CLI.
"""

__version__ = "0.1.0"
