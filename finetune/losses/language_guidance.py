"""Language guidance (Roth, Vinyals, Akata, CVPR 2022, "Integrating Language Guidance into
Vision-based Deep Metric Learning"), with the semantics of the authors' code
(ExplainableML/LanguageGuidance_for_DML, `LanguageGuide.regularize` and its `kl_div`).

Why: class labels say only "same" or "different"; the names of the classes (expert labels, ELG)
or of what an ImageNet/zero-shot classifier sees in them (pseudo-labels, PLG) say *how* different.
The loss matches each row of the batch's image similarity matrix to the same row of the language
similarity matrix, as distributions over the batch, so image similarities between different
classes take on the semantic structure of their names. The language side is fixed (precomputed
embeddings of a frozen model) and carries no gradient.

    lang[i, j]  = mean_k cos(l[i, k], l[j, k]) + shift       l: (B, K, E), K names per sample
    img[i, j]   = <x_i, x_j>                                  x: (B, D), L2-normalised
    both: entries with labels[i] == labels[j] are set to 1 + shift
    P = softmax(lang / T), Q = softmax(img / T) row-wise
    forward:  sum_i KL(P_i || Q_i) * T^2 / B
    backward: sum_i KL(Q_i || P_i) * T^2 / B   (the authors' default)

Checked line by line against the authors' code (ExplainableML/LanguageGuidance_for_DML, commit
b07ac5b): language_guidance.py L52-55 (mean over K of the cosine similarities, + shift, mask value
1 + shift), L57 (image similarities batch.mm(batch.T) of the normalised embeddings), L59-70 (forward
= kl_div(image, language) = KL(language || image), else the reverse), L110-118 (`kl_div`: both sides
masked, log_softmax / softmax at T, F.kl_div summed, * T**2 / B); parameters.py L117-122 (defaults
shift 1, direction backward, temperature 1); main.py L302 (added to the DML loss times
--language_distill_w); language_guidance_benchmark_runs.sh L9/L21/L37/L49 (PLG weights 7.5 / 10 /
6 / 5.5 for CUB200-128 / CUB200-512 / CARS196-128 / CARS196-512). Our defaults are theirs. With
T = 1 and cosine similarities in [-1, 1] + shift the row distributions are soft, so the term is
small in absolute value (~0.05 per sample on the demo) by construction, not by mistake: the weight
carries the scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from baton.registry import unknown_name

DIRECTIONS = ("forward", "backward")


class LanguageGuidance(nn.Module):
    """KL distillation of language similarities into image similarities (no parameters).

    Args:
        shift: added to the language similarities; also the excess over 1 of the value that
            same-label entries are set to (1 + shift) on both sides.
        temperature: T of both softmaxes; the KL is scaled by T^2 so its gradient scale does not
            shrink with T (as in knowledge distillation).
        direction: "backward" = KL(image || language), "forward" = KL(language || image).
    """

    def __init__(self, shift: float = 1.0, temperature: float = 1.0, direction: str = "backward"):
        super().__init__()
        if direction not in DIRECTIONS:
            raise ValueError(str(unknown_name("direction", direction, DIRECTIONS)))   # ValueError: a bad argument
        if temperature <= 0:
            raise ValueError("temperature must be > 0")
        self.shift = float(shift)
        self.temperature = float(temperature)
        self.direction = direction

    @staticmethod
    def language_similarity(language_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, B): cosine similarity of samples' k-th language embeddings, averaged over k."""
        lang = language_embeddings if language_embeddings.dim() == 3 else language_embeddings.unsqueeze(1)
        lang = F.normalize(lang.float(), p=2, dim=-1)
        return torch.einsum("ike,jke->ij", lang, lang) / lang.shape[1]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                language_embeddings: torch.Tensor) -> torch.Tensor:
        if language_embeddings.dim() not in (2, 3) or language_embeddings.shape[0] != embeddings.shape[0]:
            raise ValueError(f"language_embeddings must be (B, E) or (B, K, E) with B = {embeddings.shape[0]}, "
                             f"got {tuple(language_embeddings.shape)}")
        labels = labels.to(embeddings.device).view(-1)
        same = labels[:, None] == labels[None, :]
        fill = 1.0 + self.shift
        with torch.no_grad():
            lang = self.language_similarity(language_embeddings.to(embeddings.device)) + self.shift
            lang = lang.masked_fill(same, fill)
        img = (embeddings @ embeddings.T).masked_fill(same, fill)
        t = self.temperature
        log_p_img = F.log_softmax(img / t, dim=1)
        log_p_lang = F.log_softmax(lang / t, dim=1)
        if self.direction == "forward":   # KL(language || image)
            kl = F.kl_div(log_p_img, log_p_lang, reduction="sum", log_target=True)
        else:                             # KL(image || language)
            kl = F.kl_div(log_p_lang, log_p_img, reduction="sum", log_target=True)
        return kl * t * t / embeddings.shape[0]

    def extra_repr(self) -> str:
        return f"shift={self.shift}, temperature={self.temperature}, direction={self.direction!r}"
