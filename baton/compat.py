"""Every private API of a third-party library that baton uses, each behind one small function.

Why: a private name can change in any release without notice. Here each use is one function that
says why it is needed, what baton does without it, and what to do when it breaks; and
tests/test_compat.py calls each against the installed library, so an upgrade that removes or
changes one fails there, by name, instead of somewhere deep in a run (or, worse, silently).
Nothing here is imported at module level: each function imports its library when called.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional


# --- torch ---------------------------------------------------------------------------------------

def storage_use_counter() -> Optional[Callable[[Any], int]]:
    """A function: untyped storage -> how many references it has in this process (tensors, views,
    storage objects), or None where this torch has no such function.

    Why: the loader's reused batch buffers (pretrain/data/batch_buffers.py) may be refilled only
    when nothing refers to them any more; torch has no public use count. Private:
    `torch._C._storage_Use_Count(storage._cdata)` (torch 2.x, used by torch's own tests).
    When it breaks: the test fails; without it (None) buffers are simply not reused (every batch
    gets a new one: correct, a little slower). Look for the new name in torch/_C/__init__.pyi.
    """
    import torch

    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return None
    return lambda storage: count(storage._cdata)


def uncompiled(module: Any) -> Any:
    """The module inside a `torch.compile` wrapper (`OptimizedModule`), or None if it is not one.

    Why: a method finds its own model inside whatever wraps it. Private: `OptimizedModule._orig_mod`
    (torch has no public accessor). When it breaks: find the attribute in torch/_dynamo/eval_frame.py.
    """
    return getattr(module, "_orig_mod", None)


# --- open_clip -----------------------------------------------------------------------------------

def build_open_clip_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool = False):
    """open_clip's image tower alone, built exactly as `open_clip.CLIP.__init__` builds `.visual`.

    Why: a handoff holds only `model.visual`'s weights; this builder makes the same module, so
    they load with strict key matching, without building (and allocating) the text tower.
    Private: `open_clip.model._build_vision_tower`. When it breaks: build the full model with
    `open_clip.create_model(...)` and take `.visual` (same keys, more memory), or follow the rename.
    """
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(embed_dim, vision_cfg, quick_gelu=quick_gelu)


def find_open_clip_checkpoint(directory: str | Path) -> Optional[str]:
    """The weights file open_clip's `local-dir:` loader would pick in `directory`, or None.

    Why: `open_clip:local-dir:DIR` must read the same file open_clip itself reads (its order of
    preference among *.safetensors, *.bin, *.pth). Private: `open_clip.factory._find_checkpoint_in_dir`.
    When it breaks: copy its preference order here (open_clip/factory.py).
    """
    from open_clip.factory import _find_checkpoint_in_dir

    return _find_checkpoint_in_dir(Path(directory))


def hf_text_encoder_pooled(text: Any, tokens: Any) -> Any:
    """The pooled (pre-projection) features of open_clip's `HFTextEncoder` for a batch of token ids,
    computed as its `forward` computes them, with padding cut off the right.

    Why: a wholly locked Hugging Face tower's pooled output depends only on the caption, so
    pretrain/clip/locked_text.py caches it per caption and trains only the projection on top.
    open_clip has no public "pooled features" call. Private: the encoder's attributes
    `transformer`, `pooler` and `config.pad_token_id`, and the `pooler(output, mask)` signature
    (open_clip/hf_model.py). When it breaks (the test in tests/test_compat.py): follow
    `HFTextEncoder.forward` in the installed open_clip, or set `clip.lock_text_cache=0` (the tower is
    then run every step; same features, slower).
    """
    mask = (tokens != text.config.pad_token_id).long()
    # Trailing padding is masked out of attention and pooling, so it is cut before the transformer
    # runs: captions are short next to the context length, and the cost falls with it.
    if bool((mask[:, 1:] <= mask[:, :-1]).all()):  # right-padded rows only (BERT's tokenizers)
        width = max(int(mask.sum(1).max()), 1)
        tokens, mask = tokens[:, :width], mask[:, :width]
    return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)


# --- DeepSpeed -----------------------------------------------------------------------------------

def disable_deepspeed_op(name: str) -> None:
    """Mark DeepSpeed's C++ op `name` as unavailable, so DeepSpeed never JIT-builds it.

    Why: on CPU (gloo) DeepSpeed's shared-memory all-reduce (`deepspeed_shm_comm`) would be built
    on first use, 40-80 s, for a collective gloo does anyway. Private: the module-level dict
    `deepspeed.ops.__compatible_ops__` that `init_distributed` consults. When it breaks (a KeyError
    from the test, or a build log on CPU runs): look for how `deepspeed/comm/ccl.py` /
    `deepspeed/ops/__init__.py` decide the op is compatible, or set `DS_ACCELERATOR=cpu` options.
    """
    import deepspeed

    ops = deepspeed.ops.__compatible_ops__
    if name not in ops:
        raise KeyError(f"deepspeed.ops.__compatible_ops__ has no {name!r}: see baton/compat.py")
    ops[name] = False


def destroy_process_group() -> None:
    """Destroy torch's default process group and, when DeepSpeed set up its communication on it,
    DeepSpeed's references to its groups as well.

    Why: DeepSpeed clones the world group once (`deepspeed.utils.groups._WORLD_GROUP`, and its data /
    expert / sequence-parallel groups) and reuses the clone for every later engine. Torch's
    `destroy_process_group` alone leaves those clones behind, so the next DeepSpeed run in the same
    process (a test, a notebook, a sweep) fails in `deepspeed.initialize` ("Group ... is not
    registered"). DeepSpeed's own `deepspeed.comm.destroy_process_group` destroys the group and
    releases the clones. Not private, but it is only correct once DeepSpeed's backend exists, which
    is what `deepspeed.comm.is_initialized` says; DeepSpeed is not imported when nothing imported
    it (a DDP / FSDP run pays nothing). When it breaks (the test in tests/test_compat.py): look for
    how `deepspeed/comm/comm.py`'s destroy releases `deepspeed/utils/groups.py`'s cached groups.
    """
    import sys

    import torch.distributed as dist

    ds_comm = sys.modules.get("deepspeed.comm")
    if ds_comm is not None and ds_comm.is_initialized():
        ds_comm.destroy_process_group()
    elif dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --- pytorch-metric-learning ---------------------------------------------------------------------

@contextmanager
def pml_numpy_rng(seed: int) -> Iterator[None]:
    """pml's samplers draw from one module-global generator; point it at a generator seeded with
    `seed` for the duration, then restore it, so a sampler's order depends only on `seed`.

    Why: finetuning's batches must be the same on resume (the exact-resume test). Private-ish:
    `pytorch_metric_learning.utils.common_functions.NUMPY_RANDOM` (undocumented). When it breaks:
    seed numpy's global generator instead, or write the m-per-class sampler in baton.
    """
    import numpy as np
    from pytorch_metric_learning.utils import common_functions as c_f

    saved = c_f.NUMPY_RANDOM
    c_f.NUMPY_RANDOM = np.random.RandomState(seed % (2 ** 32))
    try:
        yield
    finally:
        c_f.NUMPY_RANDOM = saved


# --- submitit ------------------------------------------------------------------------------------

def submitit_sbatch_text(executor: Any, generic: dict[str, Any], slurm_specific: dict[str, Any],
                         map_count: Optional[int] = None) -> str:
    """The sbatch script a submitit `SlurmExecutor` would submit with these parameters, without
    submitting: `generic` in submitit's cluster-independent names (timeout_min, gpus_per_node, ...),
    `slurm_specific` without their `slurm_` prefix, `map_count` for a job array.

    Why: `baton submit --dry-run` prints the exact script a cluster would get, on a machine with no
    Slurm. Private: `SlurmExecutor._convert_parameters` (what `AutoExecutor.update_parameters`
    does to the generic names), `_make_submission_file_text` and `_submitit_command_str`; submitit
    has no public dry run. When it breaks (tests/test_compat.py): read submitit/slurm/slurm.py's
    `_internal_process_submissions`, which writes the same file before calling sbatch.
    """
    executor.update_parameters(**executor._convert_parameters(generic), **slurm_specific)
    if map_count is not None:
        executor.parameters["map_count"] = map_count
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


# --- argparse ------------------------------------------------------------------------------------

def parser_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The actions (arguments) a parser has, in the order added.

    Why: `baton shards` tightens the type of the size arguments of every source after each source
    added its own. Private: `ArgumentParser._actions` (no public list). When it breaks: have each
    source's `add_arguments` return its actions, or wrap `parser.add_argument` to record them.
    """
    return list(parser._actions)


# --- omegaconf -----------------------------------------------------------------------------------

def config_child(node: Any, key: str) -> Any:
    """The child node of a DictConfig (not its value: a nested DictConfig keeps its metadata).
    Private: `DictConfig._get_node`. When it breaks: `OmegaConf.select(node, key)` returns the
    node for containers (and the value for leaves)."""
    return node._get_node(key)


def is_free_mapping(node: Any) -> bool:
    """Whether a DictConfig section is a free `Dict[str, Any]` (its keys are the user's, e.g. a
    loss's arguments) rather than a dataclass section with fixed keys.

    Why: the free sections are opened (struct mode off) and `key={...}` replaces them. Private:
    `node._metadata.object_type` (None or dict for free mappings, the dataclass otherwise).
    When it breaks: `OmegaConf.get_type(node)` gives dict for a free mapping (the dataclass for
    a fixed section) through the public API.
    """
    return node._metadata.object_type in (dict, None)
