"""CLIP's gradient accumulation that keeps the contrastive batch (`train.grad_accum` > 1 with
`clip.accum_loss: full_batch`, the default).

Why: the contrastive loss couples every image of a batch with every caption, so summing the
gradients of independent micro-batch losses (plain accumulation, `clip.accum_loss: micro_batch`)
trains with a contrastive batch of one micro-batch x ranks: accumulation would not buy the batch
size CLIP's quality depends on. This is the two-pass scheme of GradCache (Gao et al. 2021) that
open_clip_train's `--accum-freq` also implements:

1. feature pass: each micro-batch forwarded under `torch.no_grad()` through the strategy's
   `no_grad_net` (no graph, nothing synced); its image and text features and the logit scale are
   kept, and the RNG state before it, so that pass 3 draws the same dropout masks;
2. the loss of the whole accumulated batch: `ClipLoss` over the concatenated features (gathered over
   ranks as in a step without accumulation), and its gradients with respect to the cached features
   and the logit scale;
3. gradient pass: each micro-batch forwarded again with gradients, and the backward of
   <its features, their cached gradient> + <logit scale, its gradient> / accum. By the chain rule the
   sum over micro-batches is the gradient of the full-batch loss. It goes through the strategy's
   `accumulating` / `backward`, so DDP syncs the last micro-batch only, FSDP2 and DeepSpeed
   accumulate as they always do, and fp16 loss scaling applies.

The loss logged for the step is that full-batch loss (plain accumulation logs the mean of the
micro-batches' own losses). Unlike open_clip_train, which calls backward on the full loss for every micro-batch (the logit scale
then gets its gradient accum times over), the temperature's gradient here is the full-batch one.

Memory on the device: one micro-batch of activations, plus the features of the whole accumulated
batch (2 x embed_dim numbers a sample) and its logits (those of one big batch). The step's input
batches are kept as the loader gave them, on the host (uint8 on a GPU run; with
data.decode_on_device, decoded uint8 images on the device), and `prepare`d again in pass 3. Compute: one extra forward per micro-batch (about 4/3 of plain accumulation).

Buffers that a train-mode forward updates (BatchNorm running statistics) are put back after the
feature pass, so they are updated once per micro-batch, by the gradient pass, as in plain
accumulation. BatchNorm still normalises each micro-batch by that micro-batch's statistics, so a
tower with BatchNorm gets the gradient of the full-batch loss over per-micro-batch-normalised
features, not that of one big batch; without BatchNorm (ViTs, the text transformer) the step equals
one big batch up to the order of float additions (tests/test_clip_accumulation.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from pretrain.clip.method import ClipMethod
    from pretrain.strategies import Strategy


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def full_batch_step(method: "ClipMethod", net: torch.nn.Module, strategy: "Strategy", micro_batches: Iterable[tuple],
                    step: int, total: int) -> tuple[list[torch.Tensor], dict[str, float]]:
    """`PretrainMethod.accumulate` for CLIP: the gradients of the contrastive loss over all micro-batches."""
    accum = method.cfg.train.grad_accum
    device = method.info.device
    buffers = list(strategy.model.buffers())
    saved_buffers = [b.detach().clone() for b in buffers]
    kept, rng, image_parts, text_parts = [], [], [], []
    feature_net = strategy.no_grad_net()
    with torch.no_grad():                                             # 1. the feature pass
        for tensors in micro_batches:
            rng.append(_rng_state(device))
            with strategy.autocast():
                image, text, scale = method.features(feature_net, strategy.prepare(tensors, method.on_device))
            kept.append(tensors)
            image_parts.append(image)
            text_parts.append(text)
        for b, saved in zip(buffers, saved_buffers):                  # BatchNorm statistics: as before
            b.copy_(saved)
    if len(kept) != accum:
        raise RuntimeError(f"full-batch accumulation got {len(kept)} micro-batches for train.grad_accum={accum}")
    del saved_buffers

    images = torch.cat(image_parts).requires_grad_()                 # 2. the loss of the whole batch
    texts = torch.cat(text_parts).requires_grad_()
    scale = scale.detach().requires_grad_()
    sizes = [len(part) for part in image_parts]
    del image_parts, text_parts
    with strategy.autocast():
        loss = method.loss_fn()(images, texts, scale)
    image_grads, text_grads, scale_grad = torch.autograd.grad(loss, (images, texts, scale))
    image_grads, text_grads = image_grads.split(sizes), text_grads.split(sizes)
    del images, texts

    for j in range(accum):                                            # 3. the gradient pass
        last = j == accum - 1
        _set_rng_state(rng[j], device)
        with strategy.accumulating(last):
            with strategy.autocast():
                image, text, scale = method.features(net, strategy.prepare(kept[j], method.on_device))
                terms = [(image * image_grads[j]).sum(), (text * text_grads[j]).sum(),
                         (scale * scale_grad).sum() / accum]
                share = sum(t for t, x in zip(terms, (image, text, scale)) if x.requires_grad)
            strategy.backward(share, 1, last)   # already this micro-batch's share of the step's loss
        kept[j] = None                          # its host batch can go back to the loader
    return [loss.detach().float()], {"logit_scale": scale.detach().float()}
