"""The run lifecycle both training loops share (`baton.run`): resume rules, config record, seeding,
device choice and checkpoint cadence."""

import logging
import random

import numpy as np
import pytest
import torch

from baton.checkpoint import save_checkpoint
from baton.errors import BatonError
from baton.preemption import clear_stop, request_stop
from baton.run import CheckpointCadence, RunLifecycle, choose_device, resolve_resume


def test_resume_rules_are_one_set(tmp_path):
    root = tmp_path / "checkpoints"
    assert resolve_resume(None, root) is None                 # a fresh run in an empty directory
    assert resolve_resume("latest", root) is None             # latest with nothing yet: a first start
    save_checkpoint(root, 2, {"step": 2})
    save_checkpoint(root, 4, {"step": 4})
    with pytest.raises(BatonError, match="already has checkpoints: pass resume=latest"):
        resolve_resume(None, root)                            # never over a used run directory
    assert resolve_resume("latest", root).name == "step_000004"
    assert resolve_resume(str(root / "step_000002"), root) == root / "step_000002"


def test_record_config_warns_of_each_changed_key_when_resuming_only(tmp_path, caplog):
    from finetune.config import FinetuneConfig

    cfg = FinetuneConfig(run_dir=str(tmp_path))
    RunLifecycle(tmp_path, None, 0).record_config(cfg)
    assert (tmp_path / "config.yaml").is_file()
    save_checkpoint(tmp_path / "checkpoints", 1, {"step": 1})
    cfg.optim.lr = cfg.optim.lr * 2
    with caplog.at_level(logging.WARNING, logger="baton"):
        logging.getLogger("baton").propagate = True
        RunLifecycle(tmp_path, "latest", 0).record_config(cfg)
    assert [r.message for r in caplog.records if "changed config" in r.message and "optim.lr" in r.message]
    assert f"lr: {cfg.optim.lr}" in (tmp_path / "config.yaml").read_text()
    RunLifecycle(tmp_path, "latest", 0, is_main=False).record_config(FinetuneConfig(run_dir=str(tmp_path)))
    assert f"lr: {cfg.optim.lr}" in (tmp_path / "config.yaml").read_text()   # only the main rank writes


def test_seed_sets_every_global_generator(tmp_path):
    run = RunLifecycle(tmp_path, None, 7)
    draws = []
    for _ in range(2):
        run.seed()
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(1))))
    assert draws[0] == draws[1]
    random.seed(7), np.random.seed(7), torch.manual_seed(7)
    assert draws[0] == (random.random(), float(np.random.rand()), float(torch.rand(1)))


def test_device_choice():
    assert choose_device("cpu") == torch.device("cpu")
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(BatonError, match=r"^unknown train.device 'tpu' \(did you mean 'cpu'\?\): choose one of auto, cpu, cuda$"):
        choose_device("tpu")


def test_checkpoint_cadence_every_n_every_epoch_at_the_end_and_on_stop():
    every3 = CheckpointCadence(every=3, steps_per_epoch=5, total=10)
    assert [s for s in range(1, 11) if every3.due(s)] == [3, 6, 9, 10]
    per_epoch = CheckpointCadence(every=0, steps_per_epoch=4, total=10)
    assert [s for s in range(1, 11) if per_epoch.due(s)] == [4, 8, 10]
    assert every3.after_step(4) == (False, False)
    request_stop()
    try:
        assert every3.after_step(4) == (True, True)           # a stop request checkpoints off cadence
    finally:
        clear_stop()
