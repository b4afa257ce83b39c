"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and optimiser state sharded.

Each of `method.shard_units(model)` (transformer blocks) is sharded on its own before the root,
so only one unit's full parameters exist at a time in forward and backward. bf16/fp16 come from
`MixedPrecisionPolicy` (parameters cast for compute, gradients reduced in fp32) instead of
autocast; `train.offload` keeps the sharded parameters, gradients and optimiser state in CPU
memory (`CPUOffloadPolicy`, pinned only on CUDA). fp16 (CUDA only) scales the loss with a
`ShardedGradScaler`.

FSDP2 cannot shard 0-dim parameters (CLIP's logit_scale): they are left out of sharding
(`ignored_params`), kept replicated on the device, their gradients averaged over ranks here before
clipping, and given optimiser groups of their own (same settings) so foreach kernels never mix
plain tensors and DTensors. The gradient norm for clipping covers both kinds.

Checkpoints: `torch.distributed.checkpoint` (DCP) writes each rank's shards into `dcp/` of the step
directory, from `get_state_dict` (parameter-name keys); loading reshards, so another world size,
or DDP, can resume it, and an FSDP2 run resumes a DDP `state.pt` (base.py). DCP reads tensors as
raw storage and its metadata with `weights_only` unpickling.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from baton.distributed import all_reduce
from pretrain.strategies.base import DCP_DIR, ParamGroups, Strategy, ensure_process_group


class FSDPStrategy(Strategy):
    name = "fsdp"

    def setup(self, model: nn.Module, param_groups: ParamGroups):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        ensure_process_group(self.info)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        mesh = init_device_mesh(self.info.device.type, (self.info.world_size,))
        kwargs = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
                      if dtype else MixedPrecisionPolicy(),
                      offload_policy=CPUOffloadPolicy(pin_memory=self.info.device.type == "cuda")
                      if self.cfg.train.offload else OffloadPolicy())
        model = model if self.cfg.train.offload else model.to(self.info.device)
        scalars = {p for p in model.parameters() if p.ndim == 0}
        for p in scalars:
            p.data = p.data.to(self.info.device)
        for unit in self.method.shard_units(model):
            if self.cfg.train.compile:
                unit.compile()
            fully_shard(unit, ignored_params=scalars, **kwargs)
        fully_shard(model, ignored_params=scalars, **kwargs)
        self.model = model
        self.replicated = [p for p in model.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        groups = []
        for g in param_groups(model):  # over the sharded (DTensor) parameters; replicated ones apart
            for kind in (True, False):
                params = [p for p in g["params"] if isinstance(p, DTensor) == kind]
                if params:
                    groups.append({**g, "params": params})
        self.optimizer = self.make_optimizer(groups)
        self.scaler = None
        if self.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
            self.scaler = ShardedGradScaler()
        return model, self.optimizer

    def backward(self, loss: torch.Tensor, accum: int, last: bool) -> None:
        loss = loss / accum
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, grad_clip: float | None) -> None:
        for p in self.replicated:   # FSDP2 averaged the sharded gradients; these are ours to average
            if p.grad is not None:
                all_reduce(p.grad, "mean")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if grad_clip:
            self.clip(grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def clip(self, max_norm: float) -> None:
        """`clip_grad_norm_` over sharded and replicated gradients together (one global norm)."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        sharded = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        norms = []
        if sharded:
            n = nn.utils.get_total_norm([p.grad for p in sharded])
            norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
        if plain:
            norms.append(nn.utils.get_total_norm([p.grad for p in plain]))
        total = torch.linalg.vector_norm(torch.stack([n.to(self.info.device) for n in norms]))
        for group in (sharded, plain):
            if group:
                nn.utils.clip_grads_with_norm_(group, max_norm, total)

    def save(self, step_dir: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(step_dir / DCP_DIR))
        return {"scaler": self.scaler.state_dict()} if self.scaler is not None else {}

    @staticmethod
    def read_full_model_state(step_dir: Path, state: dict) -> dict[str, torch.Tensor]:
        """Full tensors of every `model.*` entry, shaped from the DCP metadata (no model, no group)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        path = step_dir / DCP_DIR
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
        prefix = "model."
        target = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                  for k, m in metadata.state_dict_metadata.items()
                  if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
        wrapped = {"model": target}
        dcp.load(wrapped, checkpoint_id=str(path), no_dist=True)
        return wrapped["model"]
