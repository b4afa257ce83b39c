"""Training strategies (DDP, FSDP2, DeepSpeed ZeRO) on CPU with gloo, 2 ranks, the tiny CLIP (and GLIP).

Launches are expensive (imports cost seconds per process), so each runs many checks and the
tests below assert on what it left behind:

- `torch_launch` (torchrun, 2 ranks): float64 ClipLoss gradients over 2 ranks vs one process; a run
  with more loader workers than shards; DDP and FSDP2 each train 12 steps, then the same run is cut
  after step 6 (checkpoint at 4) and resumed; DDP also with grad_accum=2 (CLIP's full-batch
  accumulation, and plain with clip.accum_loss=micro_batch) and with activation checkpointing; an
  FSDP2 run resumes the cut DDP run; a DDP checkpoint loaded into an FSDP2 module (and the reverse)
  is compared tensor by tensor.
- `deepspeed_launch` (torchrun, 2 ranks, beside the torch launch): ZeRO-2 (the same 12 steps, cut + resume, grad_accum=2)
  and a short ZeRO-3 bf16 run; GLIP under DDP and ZeRO-2 (uninterrupted, cut + resumed).
- `nodes`: two torchrun agents of one process each meeting through a c10d rendezvous (two "nodes").

The three start side by side (`launches`).

Pytest runs the tests; torchrun runs this file as a script (`_worker`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from baton.checkpoint import load_checkpoint
from baton.cli import main as cli_main
from baton.logs import read_metrics
from test_pretrain import write_tiny_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 8           # 2 epochs of 64 samples at 8 per rank x 2 ranks
CUT, EVERY = 6, 4   # the cut run stops after step 6; its last checkpoint is step 4


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": f"{REPO / 'tests'}{os.pathsep}{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _launch_command(mode: str, out: Path, shards: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            __file__, mode, str(out), str(shards)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launches(tmp_path_factory, synthetic_shards) -> dict[str, Path]:
    """The torch and DeepSpeed launches and the two "nodes", run side by side (most of their time is
    imports and start-up, so they overlap well even on 2 cores)."""
    outs = {mode: tmp_path_factory.mktemp(mode) for mode in ("torch", "deepspeed", "nodes")}
    port = _free_port()
    commands = [("torch", _launch_command("torch", outs["torch"], synthetic_shards)),
                ("deepspeed", _launch_command("deepspeed", outs["deepspeed"], synthetic_shards))]
    # two torchrun agents (1 process each) that meet at a c10d endpoint like two machines
    commands += [("nodes", [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                            "--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id", "baton-test",
                            __file__, "nodes", str(outs["nodes"]), str(synthetic_shards)])] * 2
    procs = []
    for i, (mode, cmd) in enumerate(commands):
        with open(outs[mode] / f"stderr{i}.txt", "w") as err:
            procs.append((mode, i, subprocess.Popen(cmd, env=_env(), cwd=outs[mode], stdout=subprocess.DEVNULL,
                                                    stderr=err)))
    try:
        for mode, i, proc in procs:
            proc.wait(timeout=600)
    finally:
        for _, _, proc in procs:
            if proc.poll() is None:
                proc.kill()
    for mode, i, proc in procs:
        assert proc.returncode == 0, (mode, (outs[mode] / f"stderr{i}.txt").read_text()[-6000:])
    return outs


@pytest.fixture
def torch_launch(launches) -> Path:
    return launches["torch"]


@pytest.fixture
def deepspeed_launch(launches) -> Path:
    return launches["deepspeed"]


def final_state(run: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """The full model state of a run's checkpoint at `step`, whichever strategy wrote it."""
    from pretrain.strategies import full_model_state

    state, meta = load_checkpoint(run / "checkpoints" / f"step_{step:06d}")
    assert state["step"] == step
    return full_model_state(meta["path"], state)


def assert_same(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol:
            assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())
        else:
            assert torch.equal(a[k], b[k]), k


def assert_zero2_files(run: Path) -> None:
    """The run's latest checkpoint holds DeepSpeed's own files: the model once, an optimiser shard per rank."""
    step_dir = Path(load_checkpoint(run)[1]["path"])
    assert sorted(p.name for p in (step_dir / "deepspeed").iterdir()) == [
        "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def assert_learns(run: Path) -> None:
    values = losses(run)
    assert len(values) == STEPS
    first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
    assert first > 2.4 and last < 0.8 * first, (first, last)  # ln(16) = 2.77 at random init


# ---------------------------------------------------------------- DDP and FSDP2

@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_resume_equals_the_uninterrupted_run_and_loss_falls(torch_launch, strategy):
    full, cut = torch_launch / strategy / "full", torch_launch / strategy / "cut"
    assert_same(final_state(full), final_state(cut))
    assert_learns(full)
    assert load_checkpoint(cut)[1]["strategy"] == strategy
    if strategy == "ddp":  # one state.pt; optimiser state too is bit-identical
        a, b = load_checkpoint(full)[0], load_checkpoint(cut)[0]
        assert all(torch.equal(a["optimizer"]["state"][k]["exp_avg_sq"], b["optimizer"]["state"][k]["exp_avg_sq"])
                   for k in a["optimizer"]["state"])
    else:  # DCP shards beside the small state.pt
        step_dir = Path(load_checkpoint(full)[1]["path"])
        assert (step_dir / "dcp" / ".metadata").is_file() and "model" not in load_checkpoint(full)[0]


@pytest.mark.slow
def test_clip_loss_gradients_over_two_ranks_equal_the_full_batch(torch_launch):
    """float64: DDP gradients of ClipLoss(local_loss, gather_with_grad) on 2 x 4 samples equal the
    single-process gradients of the 8-sample batch."""
    result = json.loads((torch_launch / "gradients.json").read_text())
    assert result["num_params_compared"] > 10
    assert result["max_grad_diff"] < 1e-10, result
    assert result["max_grad_abs"] > 1e-4  # the gradients compared are not trivially zero


@pytest.mark.slow
def test_more_loader_workers_than_shards(torch_launch):
    """2 ranks x 3 workers > 4 shards: every step runs on both ranks, without hanging."""
    state, _ = load_checkpoint(torch_launch / "workers")
    assert state["step"] == 4  # 64 samples // (8 per rank x 2 ranks)
    assert [r["step"] for r in read_metrics(torch_launch / "workers" / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.slow
def test_ranks_stay_in_sync(torch_launch):
    sums = [json.loads((torch_launch / f"sync{r}.json").read_text()) for r in (0, 1)]
    assert len(sums[0]["ddp"]) == STEPS and sums[0]["ddp"] == sums[1]["ddp"]


@pytest.mark.slow
def test_ddp_and_fsdp_checkpoints_load_into_each_other(torch_launch):
    result = json.loads((torch_launch / "convert.json").read_text())
    assert result["ddp_to_fsdp_model"] == result["ddp_to_fsdp_optim"] == 0.0   # exact
    assert result["fsdp_to_ddp_model"] == 0.0 and result["optim_entries"] > 10
    # a whole FSDP2 run resumed from the cut DDP run ends where the uninterrupted FSDP2 run does
    # (up to the order of float additions in all-reduce vs reduce-scatter)
    assert_same(final_state(torch_launch / "ddp_to_fsdp"), final_state(torch_launch / "fsdp" / "full"), atol=1e-5)


@pytest.mark.slow
def test_grad_accumulation_and_activation_checkpointing(torch_launch, deepspeed_launch):
    # (both runs stop after step 4, on the schedule of the full run, which kept its step-4 checkpoint)
    full = final_state(torch_launch / "ddp" / "full", EVERY)
    # activation checkpointing recomputes the same numbers
    assert_same(final_state(torch_launch / "ddp" / "ckpt", EVERY), full, atol=1e-6)
    # 2 micro-batches of 4, CLIP's full-batch accumulation: DDP (no_sync) and DeepSpeed (its own
    # accumulation) train the weights of one batch of 8; plain accumulation (micro_batch) does not
    for accumulated in (torch_launch / "ddp" / "accum", deepspeed_launch / "ds2" / "accum"):
        assert_same(final_state(accumulated, EVERY), full, atol=1e-5)
    plain = final_state(torch_launch / "ddp" / "accum_micro", EVERY)
    assert not torch.allclose(plain["visual.proj"], full["visual.proj"], atol=1e-4)
    assert [r["step"] for r in read_metrics(torch_launch / "ddp" / "accum" / "metrics.jsonl")] == list(range(1, EVERY + 1))


# ---------------------------------------------------------------- DeepSpeed

@pytest.mark.slow
def test_deepspeed(deepspeed_launch):
    full, cut = deepspeed_launch / "ds2" / "full", deepspeed_launch / "ds2" / "cut"
    assert_same(final_state(full), final_state(cut))   # ZeRO-2 resume is exact
    assert_learns(full)
    assert_zero2_files(full)
    sums = [json.loads((deepspeed_launch / f"sync{r}.json").read_text())["ds2"] for r in (0, 1)]
    assert len(sums[0]) == STEPS and sums[0] == sums[1]
    # ZeRO-3 with bf16 compute: runs, learns a little, exports through zero_to_fp32
    ds3 = losses(deepspeed_launch / "ds3")
    assert len(ds3) == 4 and all(v == v for v in ds3) and ds3[-1] < ds3[0]
    assert final_state(deepspeed_launch / "ds3", 4)["logit_scale"].shape == ()


@pytest.mark.slow
def test_glip_on_two_ranks_deepspeed_follows_ddp_and_resumes_exactly(deepspeed_launch):
    """GLIP (`method: glip`, the tiny model on scenes of shapes) under torchrun with 2 ranks: ZeRO-2's
    losses follow DDP's (its flat gradient buffers sum in another order, ~1e-6 apart), and the run
    cut after step 3 and resumed from DeepSpeed's checkpoint files (each rank's optimiser shard)
    ends with the uninterrupted run's weights bit for bit."""
    root = deepspeed_launch / "glip"
    ddp, full, cut = (losses(root / r) for r in ("ddp", "full", "cut"))
    assert len(full) == len(ddp) == GLIP_STEPS and full == pytest.approx(ddp, rel=1e-3)
    assert cut == full and sum(full[-2:]) < sum(full[:2])
    assert_zero2_files(root / "cut")
    a, b = final_state(root / "full", GLIP_STEPS), final_state(root / "cut", GLIP_STEPS)
    assert a["bias0"].shape == () and set(a) == set(final_state(root / "ddp", GLIP_STEPS))
    assert_same(a, b)


# ---------------------------------------------------------------- export from any strategy

@pytest.mark.slow
def test_export_is_the_same_from_every_strategy(torch_launch, deepspeed_launch, tmp_path):
    from safetensors.torch import load_file

    runs = {"ddp": torch_launch / "ddp" / "full", "fsdp": torch_launch / "fsdp" / "full",
            "deepspeed": deepspeed_launch / "ds2" / "full"}
    handoffs = {}
    for name, run in runs.items():
        assert cli_main(["export", str(run), str(tmp_path / name)]) == 0
        meta = json.loads((tmp_path / name / "backbone.json").read_text())
        assert meta["source"]["step"] == STEPS and meta["source"]["method"] == "clip"
        handoffs[name] = {**load_file(str(tmp_path / name / "backbone.safetensors")),
                          **{f"text.{k}": v for k, v in load_file(str(tmp_path / name / "text_tower.safetensors")).items()}}
        # the handoff holds exactly the checkpoint's weights
        full = final_state(run)
        assert all(torch.equal(v, full[f"visual.{k}"]) for k, v in handoffs[name].items() if not k.startswith("text."))
    # the three strategies trained the same model (up to float summation order)
    assert_same(handoffs["fsdp"], handoffs["ddp"], atol=1e-5)
    assert_same(handoffs["deepspeed"], handoffs["ddp"], atol=1e-5)


# ---------------------------------------------------------------- two "nodes"

@pytest.mark.slow
def test_two_node_rendezvous(launches):
    """Two torchrun agents (1 process each) met at a c10d endpoint and trained like one 2-rank job."""
    nodes = launches["nodes"]
    ranks = sorted(json.loads((nodes / f"node{r}.json").read_text())["world"] for r in (0, 1))
    assert ranks == [[0, 2], [1, 2]]
    # the same job as the single-machine 2-rank DDP run
    assert_same(final_state(nodes / "run"), final_state(launches["torch"] / "ddp" / "full"), atol=1e-6)


# ---------------------------------------------------------------- the torchrun side

def _worker(mode: str, out: Path, shards: str) -> None:
    import torch.distributed as dist

    import pretrain.train
    from baton.config import load_config
    from pretrain.config import PretrainConfig

    rank = int(os.environ["RANK"])
    destroy = pretrain.train.destroy
    pretrain.train.destroy = lambda: None   # several runs in one process group
    cfg_path = write_tiny_config(out / f"c{rank}.yaml", out / "unused", shards, optim={"lr": 2e-3, "warmup_steps": 2},
                                 train={"epochs": 2, "checkpoint_every": EVERY, "log_every": 1})
    sums: dict[str, list[float]] = {}

    def run(run_dir: Path, *overrides: str, sync: str | None = None) -> None:
        cfg = load_config(PretrainConfig, cfg_path, [f"run_dir={run_dir}", *overrides])
        hook = None
        if sync:  # a checksum of this rank's (replicated) weights after every step
            sums[sync] = []
            hook = lambda step, model: sums[sync].append(sum(p.double().sum().item() for p in model.parameters()))
        assert pretrain.train.train(cfg, on_step=hook) == 0

    def full_and_cut(root: Path, *overrides: str, sync: str | None = None) -> None:
        run(root / "full", *overrides, sync=sync)
        run(root / "cut", *overrides, f"train.stop_after_steps={CUT}")
        run(root / "cut", *overrides, "resume=latest")

    if mode == "torch":
        _gradient_check(out)
        run(out / "workers", "data.workers=3", "train.epochs=1")
        full_and_cut(out / "ddp", "train.strategy=ddp", sync="ddp")
        full_and_cut(out / "fsdp", "train.strategy=fsdp")
        run(out / "ddp" / "accum", "data.batch_size=4", "train.grad_accum=2", f"train.stop_after_steps={EVERY}")
        run(out / "ddp" / "accum_micro", "data.batch_size=4", "train.grad_accum=2", "clip.accum_loss=micro_batch",
            f"train.stop_after_steps={EVERY}")
        run(out / "ddp" / "ckpt", "train.grad_checkpointing=true", f"train.stop_after_steps={EVERY}")
        shutil.copytree(out / "ddp" / "cut" / "checkpoints" / "step_000004", out / "ddp_to_fsdp" / "checkpoints" / "step_000004") \
            if rank == 0 else None
        dist.barrier()
        run(out / "ddp_to_fsdp", "train.strategy=fsdp", f"resume={out / 'ddp_to_fsdp' / 'checkpoints' / 'step_000004'}")
        _convert(cfg_path, out, rank)
    elif mode == "deepspeed":
        full_and_cut(out / "ds2", "train.strategy=deepspeed", "train.zero_stage=2", sync="ds2")
        run(out / "ds2" / "accum", "train.strategy=deepspeed", "data.batch_size=4", "train.grad_accum=2",
            f"train.stop_after_steps={EVERY}")
        run(out / "ds3", "train.strategy=deepspeed", "train.zero_stage=3", "train.precision=bf16", "train.max_steps=4")
        _glip_runs(out, rank)
    elif mode == "nodes":
        run(out / "run")
        (out / f"node{rank}.json").write_text(json.dumps({"world": [rank, dist.get_world_size()]}))
    (out / f"sync{rank}.json").write_text(json.dumps(sums))
    destroy()


GLIP_STEPS, GLIP_CUT = 6, 3   # 3 epochs of 32 scenes at 8 per rank x 2 ranks; the cut run stops after step 3


def _glip_runs(out: Path, rank: int) -> None:
    """GLIP on the engine over 2 ranks: DDP, and ZeRO-2 uninterrupted and cut + resumed."""
    import torch.distributed as dist

    from test_glip_engine import make_grounding_shards, run_engine

    scenes = out / "scenes"
    if rank == 0:
        make_grounding_shards(scenes, n=32)
    dist.barrier()
    common = ("train.epochs=3", "train.log_every=1", f"train.checkpoint_every={GLIP_CUT}")
    ds = ("train.strategy=deepspeed", "train.zero_stage=2")
    assert run_engine(scenes, out / "glip" / "ddp", *common, "train.strategy=ddp") == 0
    assert run_engine(scenes, out / "glip" / "full", *common, *ds) == 0
    assert run_engine(scenes, out / "glip" / "cut", *common, *ds, f"train.stop_after_steps={GLIP_CUT}") == 0
    assert run_engine(scenes, out / "glip" / "cut", *common, *ds, "resume=latest") == 0


def _gradient_check(out: Path) -> None:
    from torch import nn

    from baton.distributed import DistInfo, init_distributed
    from pretrain.clip.method import ClipMethod
    from pretrain.clip.model import build_clip
    from pretrain.clip.config import ClipConfig
    from pretrain.config import pretrain_config
    from test_pretrain import TINY_MODEL

    def loss(net, images, texts, info):  # the method's loss: open_clip ClipLoss(local_loss, gather_with_grad)
        return ClipMethod(pretrain_config(clip=ClipConfig(**TINY_MODEL)), info).loss(net, (images, texts), 0, 1)[0]

    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_clip(ClipConfig(**TINY_MODEL)).double()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = torch.randint(1, 1000, (8, 16), generator=g)
    half = slice(4 * info.rank, 4 * (info.rank + 1))
    reference = build_clip(ClipConfig(**TINY_MODEL)).double()
    reference.load_state_dict(model.state_dict())
    ddp = nn.parallel.DistributedDataParallel(model)  # kept alive: its hooks all-reduce in backward
    loss(ddp, images[half], texts[half], info).backward()
    if info.rank == 0:
        loss(reference, images, texts, DistInfo()).backward()
        ref = dict(reference.named_parameters())
        diffs = [(p.grad - ref[n].grad).abs().max().item() for n, p in model.named_parameters()]
        (out / "gradients.json").write_text(json.dumps({
            "num_params_compared": len(diffs), "max_grad_diff": max(diffs),
            "max_grad_abs": max(p.grad.abs().max().item() for p in model.parameters())}))


def _convert(cfg_path: Path, out: Path, rank: int) -> None:
    """Load a DDP checkpoint into an FSDP2 module and an FSDP2 checkpoint into a DDP module; compare."""
    from baton.config import load_config
    from baton.distributed import init_distributed
    from pretrain.clip.method import ClipMethod
    from pretrain.config import PretrainConfig
    from pretrain.strategies import full_model_state, strategy_class
    from pretrain.strategies.base import full_state

    def loaded(strategy: str, ckpt: Path):
        cfg = load_config(PretrainConfig, cfg_path, [f"train.strategy={strategy}"])
        info = init_distributed("cpu")
        method = ClipMethod(cfg, info)
        s = strategy_class(strategy)(cfg, info, method)
        s.setup(method.build_model(), method.param_groups)
        state, meta = load_checkpoint(ckpt)
        s.load(Path(meta["path"]), state)
        return full_state(s.model, s.optimizer), state, meta

    def diff(a: dict, b: dict) -> float:
        assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
        return max((a[k].float() - b[k].float()).abs().max().item() for k in a)

    (model, optim), _, _ = loaded("fsdp", out / "ddp" / "full")
    ddp_state = load_checkpoint(out / "ddp" / "full")[0]  # afresh: set_state_dict fills DTensors into what it is given
    optim_diffs = [diff(optim["state"][k], ddp_state["optimizer"]["state"][k]) for k in ddp_state["optimizer"]["state"]]
    result = {"ddp_to_fsdp_model": diff(model, ddp_state["model"]), "ddp_to_fsdp_optim": max(optim_diffs),
              "optim_entries": len(optim_diffs)}
    (model, _), fsdp_state, meta = loaded("ddp", out / "fsdp" / "full")
    result["fsdp_to_ddp_model"] = diff(model, full_model_state(meta["path"], fsdp_state))
    if rank == 0:
        (out / "convert.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]), sys.argv[3])
