"""A pretraining config the strategies refuse is refused by name before any process group starts
and before the run directory is made: DeepSpeed's own keys that baton sets (or that would be silently
dropped), a ZeRO stage it lacks, an unknown strategy or method, fp16 without a GPU. The 2-rank runs
of each strategy: tests/test_strategies.py."""

from __future__ import annotations

import pytest

from baton.cli import main as cli_main
from test_pretrain import write_tiny_config


@pytest.mark.slow  # importing deepspeed takes seconds
def test_deepspeed_config_errors_come_before_any_process_group(tmp_path, synthetic_shards, capsys):
    import torch.distributed as dist

    run = tmp_path / "run"
    cfg = write_tiny_config(tmp_path / "c.yaml", run, synthetic_shards, train={"strategy": "deepspeed"})
    cases = {
        "train.deepspeed={bogus_key: 1}": "bogus_key",
        "train.deepspeed={zero_optimization: {stage: 2, overlap_com: true}}": "overlap_com",
        "train.deepspeed={train_batch_size: 64}": "train_batch_size=64",
        "train.deepspeed={gradient_accumulation_steps: 4}": "train.grad_accum (1)",
        "train.deepspeed={optimizer: {type: Adam}}": "optim.",
        "train.zero_stage=4": "zero_stage",
        "train.precision=fp16": "CUDA",
    }
    for override, expected in cases.items():
        assert cli_main(["pretrain", str(cfg), override]) == 2, override
        err = capsys.readouterr().err
        assert expected in err, (override, err)
        assert not dist.is_initialized() and not run.exists(), override
    assert cli_main(["pretrain", str(cfg), "train.strategy=zero"]) == 2
    assert "ddp, fsdp, deepspeed" in capsys.readouterr().err
    assert cli_main(["pretrain", str(cfg), "method=mae"]) == 2
    assert "clip, dino" in capsys.readouterr().err


def test_fp16_needs_a_gpu(tmp_path, synthetic_shards, capsys):
    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards, train={"precision": "fp16"})
    assert cli_main(["pretrain", str(cfg)]) == 2
    assert "fp16 needs a CUDA GPU" in capsys.readouterr().err
