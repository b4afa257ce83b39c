"""`baton export CHECKPOINT OUT`: write a pretrain checkpoint as a backbone handoff.

Works for a checkpoint of any strategy (DDP `state.pt`, FSDP2 DCP shards, DeepSpeed ZeRO files):
the strategy that wrote it rebuilds the full model state dict in this one process
(`pretrain.strategies.full_model_state`), and the run's method writes the handoff from it
(`PretrainMethod.export`; CLIP: the image tower plus `text_tower.safetensors`, and the whole CLIP in
open_clip's `local-dir:` layout; DINO: the teacher's timm backbone with timm's `config.json`).
An open_clip / open_clip_train checkpoint needs no export: finetuning reads it as `backbone=open_clip:...`.
"""

from __future__ import annotations

from pathlib import Path

from baton.checkpoint import load_checkpoint
from baton.config import from_yaml
from baton.distributed import DistInfo
from baton.errors import BatonError
from baton.handoff import foreign_checkpoint_hint
from baton.io import output_dir
from pretrain.config import PretrainConfig
from pretrain.method import build_method
from pretrain.strategies import full_model_state

USAGE = ("usage: baton export CHECKPOINT OUT\n"
         "  CHECKPOINT: a pretrain run directory, its checkpoints/ directory or a step directory\n"
         "  OUT: directory to write backbone.safetensors and backbone.json into (CLIP runs: also\n"
         "       open_clip_config.json + open_clip_model.safetensors, for open_clip's local-dir:OUT)")


def export(checkpoint: str | Path, out: str | Path) -> Path:
    """Export and return OUT. Raises BatonError when the checkpoint is missing or not a pretrain run,
    or OUT cannot be a directory."""
    foreign = foreign_checkpoint_hint(checkpoint)
    if foreign:
        raise BatonError(f"baton export converts `baton pretrain` runs, and {checkpoint} is not one; {foreign}")
    state, meta = load_checkpoint(checkpoint)
    if "config" not in state or "step" not in state:
        raise BatonError(f"{meta['path']} is not a `baton pretrain` checkpoint (no config/step in its state)")
    output_dir(out, "OUT")   # before the export's work: a file there is an error naming it, not a traceback
    cfg = from_yaml(PretrainConfig, state["config"])
    method = build_method(cfg, DistInfo())
    method.source = {"checkpoint": str(Path(meta["path"]).resolve()), "step": int(state["step"])}
    return method.export(full_model_state(meta["path"], state), Path(out))


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) != 2:
        raise BatonError(f"expected CHECKPOINT OUT, got {len(argv)} argument(s)\n{USAGE}")
    out = export(argv[0], argv[1])
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir() if not p.name.startswith('.')))}")
    return 0
