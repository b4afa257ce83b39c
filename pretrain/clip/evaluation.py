"""CLIP evaluation during training: zero-shot classification and image<->text retrieval on held-out classes.

`evaluate_clip` embeds held-out labelled shards (`pretrain.data.labelled`) and returns

- `eval/zeroshot_top1`, `eval/zeroshot_top5`: each image against every held-out class, a class being
  its name put through the prompt templates into the text tower, the template embeddings averaged
  and normalised (open_clip's `build_zero_shot_classifier`);
- `eval/image_to_text_R@1|5`, `eval/text_to_image_R@1|5`: each image against every caption and each
  caption against every image (open_clip_train's `get_clip_metrics`, but see ties below);
- `eval/samples`, `eval/classes`, `eval/skipped` (samples left out: corrupt, or beyond none).

All fractions in [0, 1].

Distributed (ranks from `baton.distributed`): rank r embeds samples r, r+W, r+2W, ... and the
classes r, r+W, ...; the embeddings (N x D, never N x N) are gathered so each rank holds all
candidates, each rank scores only its own queries, `chunk_size` queries at a time, and the hit counts
are summed over ranks. No rank ever holds more than chunk_size x max(N, classes) scores, and the
numbers do not depend on the world size.

Ties and duplicates, decided the same way on any number of ranks:
- positives are every candidate indistinguishable from the true one: captions with the same token
  ids (duplicate captions, or captions equal up to the context-length cut) and classes whose
  prompts tokenise identically;
- a query scores a hit at k when fewer than k negatives score at least as high as its best
  positive. An exact tie counts against the model, so a collapsed model (all embeddings equal)
  scores 0, not 1.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from baton.distributed import DistInfo, all_reduce
from baton.errors import BatonError
from pretrain.clip.config import ClipEvalConfig
from pretrain.data.labelled import LabelledSample, read_labelled
from pretrain.data.samples import decode_image

KS = (1, 5)


def resolve_templates(templates: Any) -> Sequence[Callable[[str], str] | str]:
    """`clip.eval.templates` -> what `build_zero_shot_classifier` takes (open_clip's own lists where named)."""
    from open_clip import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    named = {"simple": SIMPLE_IMAGENET_TEMPLATES, "openai": OPENAI_IMAGENET_TEMPLATES}
    if isinstance(templates, str):
        if templates not in named:
            raise BatonError(f"clip.eval.templates must be 'simple', 'openai' or a list of format strings "
                             f"like ['a photo of a {{}}.'], not {templates!r}")
        return tuple(named[templates])
    items = list(templates or [])
    bad = [t for t in items if not isinstance(t, str) or t.count("{}") != 1]
    if not items or bad:
        raise BatonError(f"clip.eval.templates: each template needs exactly one '{{}}' for the class name "
                         f"(e.g. 'a photo of a {{}}.'); got {bad[0] if bad else items!r}")
    return items


def count_hits(queries: torch.Tensor, query_groups: torch.Tensor, candidates: torch.Tensor,
               candidate_groups: torch.Tensor, ks: Sequence[int] = KS, chunk_size: int = 1024) -> torch.Tensor:
    """Hits at each k of `ks` (a LongTensor): queries whose best positive has fewer than k negatives
    scoring >= it. Positives of a query are the candidates of its group; each query needs one.

    Scores are dot products (normalised embeddings: cosine), `chunk_size` queries at a time.
    """
    hits = torch.zeros(len(ks), dtype=torch.long, device=queries.device)
    for start in range(0, queries.shape[0], chunk_size):
        q, g = queries[start:start + chunk_size], query_groups[start:start + chunk_size]
        scores = q @ candidates.T
        positive = g[:, None] == candidate_groups[None, :]
        if not bool(positive.any(dim=1).all()):
            raise ValueError("count_hits: a query has no positive candidate")
        best = scores.masked_fill(~positive, float("-inf")).max(dim=1).values
        ahead = ((scores >= best[:, None]) & ~positive).sum(dim=1)
        hits += torch.stack([(ahead < k).sum() for k in ks])
    return hits


def _gather_rows(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Every rank's rows of `x` (sizes may differ), concatenated in rank order, on every rank."""
    if not (info.distributed and dist.is_initialized()):
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(info.world_size)]
    dist.all_gather(sizes, n)
    most = int(max(s.item() for s in sizes))
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])


def _groups(rows: torch.Tensor) -> torch.Tensor:
    """A group id per row: equal rows share one."""
    return torch.unique(rows, dim=0, return_inverse=True)[1]


def _image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised image features through the model's forward (not `encode_image`): under FSDP2 only
    the root forward gathers the root's own parameters."""
    out = model(image=images)
    return (out["image_features"] if isinstance(out, dict) else out[0]).float()


def _text_features(model: nn.Module, texts: torch.Tensor) -> torch.Tensor:
    out = model(text=texts)
    return (out["text_features"] if isinstance(out, dict) else out[1]).float()


class _TextTower:
    """What `build_zero_shot_classifier` calls (`encode_text`), routed through the forward."""

    def __init__(self, model: nn.Module):
        self.model = model

    def encode_text(self, texts: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return _text_features(self.model, texts)


def _embed_owned(model: nn.Module, owned: list[LabelledSample], preprocess: Callable, tokenizer: Callable,
                 batch_size: int, device: torch.device) -> tuple[list[int], list[torch.Tensor], list[torch.Tensor], int]:
    """(indices, image feature batches, caption feature batches, bad images) of this rank's samples."""
    indices, images, texts, bad = [], [], [], 0
    for start in range(0, len(owned), batch_size):
        pixels, captions = [], []
        for s in owned[start:start + batch_size]:
            try:
                pixels.append(preprocess(decode_image(s.image)))
            except Exception:  # undecodable (`Rejected`), or a transform failing on an odd image
                bad += 1
                continue
            indices.append(s.index)
            captions.append(s.caption)
        if pixels:
            images.append(_image_features(model, torch.stack(pixels).to(device)))
            texts.append(_text_features(model, tokenizer(captions).to(device)))
    return indices, images, texts, bad


@torch.no_grad()
def evaluate_clip(model: nn.Module, ecfg: ClipEvalConfig, info: DistInfo, preprocess: Callable, tokenizer: Callable,
                  autocast: Callable = nullcontext) -> dict[str, float]:
    """Zero-shot top-1/top-5 and image<->text Recall@1/@5 of `model` on `ecfg.shards`; every rank returns
    the same dict (every rank of a distributed run must call it: it uses collectives).

    model: the open_clip model, unwrapped (not the DDP wrapper; FSDP2-sharded in place is fine): it is
        called as `model(image=...)` and `model(text=...)`, which return normalised features.
    preprocess: the evaluation image transform (PIL -> tensor, e.g. `build_transforms(...)[1]`).
    tokenizer: captions -> LongTensor (`build_tokenizer(cfg.clip)`).
    autocast: a context factory for the forward passes (e.g. bf16 on GPU); features are scored in fp32.
    The model is put in eval mode and back in its previous mode afterwards.
    """
    from open_clip import build_zero_shot_classifier

    if not ecfg.shards:
        raise BatonError("clip.eval.shards is not set: point it at held-out labelled shards (e.g. data/emoji/test)")
    if ecfg.batch_size < 1 or ecfg.chunk_size < 1:
        raise BatonError(f"clip.eval.batch_size and clip.eval.chunk_size must be >= 1, not {ecfg.batch_size}, {ecfg.chunk_size}")
    templates = resolve_templates(ecfg.templates)
    data = read_labelled(ecfg.shards, ecfg.max_samples, info.rank, info.world_size, key="clip.eval.shards")
    device = info.device
    was_training = model.training
    model.eval()
    try:
        with autocast():
            width = _text_features(model, tokenizer([""]).to(device)).shape[-1]
            indices, images, texts, bad = _embed_owned(model, data.owned(), preprocess, tokenizer,
                                                       ecfg.batch_size, device)
        local_index = torch.tensor(indices, dtype=torch.long, device=device)
        local_images = torch.cat(images) if images else torch.zeros(0, width, device=device)
        local_texts = torch.cat(texts) if texts else torch.zeros(0, width, device=device)

        all_index = _gather_rows(local_index, info)
        if all_index.numel() == 0:
            raise BatonError(f"clip.eval.shards={ecfg.shards!r}: no held-out image could be decoded "
                             f"({bad} bad on rank {info.rank}); rewrite the shards with `baton shards`")
        all_images, all_texts = _gather_rows(local_images, info), _gather_rows(local_texts, info)
        valid = sorted(all_index.tolist())
        position = {index: i for i, index in enumerate(valid)}      # sample index -> row in `valid`
        samples = [data.samples[i] for i in valid]

        # Captions that tokenise alike are one group: duplicates are all positives of each other.
        caption_group = _groups(tokenizer([s.caption for s in samples])).to(device)
        local_rows = torch.tensor([position[i] for i in indices], dtype=torch.long, device=device)
        all_rows = torch.tensor([position[i] for i in all_index.tolist()], dtype=torch.long, device=device)
        local_captions = caption_group[local_rows] if indices else caption_group[:0]
        all_captions = caption_group[all_rows]
        image_to_text = count_hits(local_images, local_captions, all_texts, all_captions, KS, ecfg.chunk_size)
        text_to_image = count_hits(local_texts, local_captions, all_images, all_captions, KS, ecfg.chunk_size)

        # Zero-shot over the held-out classes; rank r embeds classes r, r+W, ...
        classes = sorted({s.label for s in samples})
        class_of = {c: i for i, c in enumerate(classes)}
        prompts = [[t.format(c) if isinstance(t, str) else t(c) for t in templates] for c in classes]
        class_group = _groups(torch.stack([tokenizer(p).flatten() for p in prompts])).to(device)
        mine = list(range(info.rank, len(classes), info.world_size))
        weights = torch.zeros(0, width, device=device)
        if mine:
            with autocast():
                weights = build_zero_shot_classifier(
                    _TextTower(model), tokenizer, [classes[i] for i in mine], templates,
                    num_classes_per_batch=max(1, ecfg.batch_size // len(templates)), device=device).T.float()
        all_weights = _gather_rows(weights, info)
        all_classes = _gather_rows(torch.tensor(mine, dtype=torch.long, device=device), info)
        local_labels = torch.tensor([class_of[data.samples[i].label] for i in indices], dtype=torch.long,
                                    device=device)
        zeroshot = count_hits(local_images, class_group[local_labels], all_weights, class_group[all_classes],
                              KS, ecfg.chunk_size)
        totals = all_reduce(torch.cat([image_to_text, text_to_image, zeroshot,
                                       torch.tensor([bad], dtype=torch.long, device=device)]), "sum")
    finally:
        model.train(was_training)
    n = len(valid)
    i2t, t2i, zs, bad_images = totals[:2].tolist(), totals[2:4].tolist(), totals[4:6].tolist(), int(totals[6])
    data.check_skipped(ecfg.max_skipped_fraction, f"clip.eval.shards={ecfg.shards!r}", "clip.eval.max_skipped_fraction",
                       bad_images=bad_images)
    out = {f"eval/zeroshot_top{k}": zs[j] / n for j, k in enumerate(KS)}
    out.update({f"eval/image_to_text_R@{k}": i2t[j] / n for j, k in enumerate(KS)})
    out.update({f"eval/text_to_image_R@{k}": t2i[j] / n for j, k in enumerate(KS)})
    out.update({"eval/samples": float(n), "eval/classes": float(len(classes)),
                "eval/skipped": float(sum(data.skipped.values()) + bad_images)})
    return out
