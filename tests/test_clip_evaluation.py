"""CLIP evaluation during training (pretrain/clip/evaluation.py, pretrain/data/labelled.py):

- the metrics equal a brute-force single-process computation (full N x N scores, a sort per query)
  on the synthetic shards, whose captions come 4 times each (duplicates are positives);
- with unique captions they equal open_clip_train's own `get_clip_metrics` and top-k zero-shot
  accuracy (its `accuracy` rule; the function itself fails on numpy 2);
  corrupt samples are skipped and counted, a sample without a JSON class is its caption's class;
- the tie rule on exact ties, and `count_hits` against brute force on random tied inputs;
- two ranks (gloo, one torchrun launch) return the same numbers as one.

Pytest runs the tests; torchrun runs this file as a script (`_worker`).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from baton.distributed import DistInfo
from baton.errors import BatonError
from pretrain.clip.config import ClipEvalConfig as EvalConfig
from pretrain.clip.evaluation import count_hits, evaluate_clip, resolve_templates
from pretrain.data.labelled import read_labelled

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
METRICS = ("eval/zeroshot_top1", "eval/zeroshot_top5", "eval/image_to_text_R@1", "eval/image_to_text_R@5",
           "eval/text_to_image_R@1", "eval/text_to_image_R@5")


def tiny_clip(seed: int = 0):
    """(model, eval transform, tokenizer) of a seeded random tiny CLIP."""
    from pretrain.clip.model import build_clip, build_tokenizer, build_transforms, preprocess_cfg
    from pretrain.clip.config import ClipConfig
    from pretrain.clip.config import AugmentConfig

    mcfg = ClipConfig(name="test-tiny", config=TINY)
    torch.manual_seed(seed)
    model = build_clip(mcfg)
    return model, build_transforms(preprocess_cfg(model), AugmentConfig())[1], build_tokenizer(mcfg)


def write_labelled_shards(out: Path) -> dict:
    """Two shards: 12 unique-caption samples with a JSON class, 3 whose class is their caption, and 3
    corrupt ones (an undecodable image, no caption, bad JSON). Returns what a reader should find."""
    import webdataset as wds
    from conftest import COLORS, SHAPES, draw_shape

    rng = np.random.default_rng(1)
    out.mkdir(parents=True, exist_ok=True)

    def png(color: str, shape: str) -> bytes:
        buf = io.BytesIO()
        draw_shape(shape, COLORS[color], 32, rng).save(buf, format="PNG")
        return buf.getvalue()

    samples = []
    for i, (color, shape) in enumerate((c, s) for c in COLORS for s in SHAPES[:3]):
        samples.append({"__key__": f"k{i:03d}", "png": png(color, shape), "txt": f"{color} {shape} number {i}",
                        "json": json.dumps({"class": f"{color} {shape}"})})
    samples.append({"__key__": "nojson", "png": png("red", "cross"), "txt": "a red cross"})
    samples.append({"__key__": "noclass", "png": png("blue", "cross"), "txt": "a blue cross",
                    "json": json.dumps({"design": "x"})})
    samples.append({"__key__": "badimage", "png": b"not a png", "txt": "broken", "json": "{}"})
    samples.append({"__key__": "nocaption", "png": png("green", "cross"), "json": "{}"})
    samples.append({"__key__": "badjson", "png": png("green", "cross"), "txt": "green", "json": "{nope"})
    samples.append({"__key__": "yellowx", "png": png("yellow", "cross"), "txt": "yellow cross",
                    "json": json.dumps({"class": "yellow cross"})})
    for n, chunk in enumerate((samples[:9], samples[9:])):
        with wds.TarWriter(str(out / f"shard-{n:06d}.tar")) as w:
            for s in chunk:
                w.write(s)
    return {"valid": 15, "readable": 16, "skipped_at_read": {"missing_caption": 1, "bad_json": 1}}


@pytest.fixture(scope="module")
def labelled_shards(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("labelled")
    write_labelled_shards(d)
    return d


def brute_force(model, shards, preprocess, tokenizer, templates) -> dict[str, float]:
    """One process, the whole N x N score matrix and a full sort per query: a query hits at k when its
    first positive (same caption / class) comes before position k, exact ties sorting negatives first."""
    from open_clip import build_zero_shot_classifier_legacy
    from pretrain.data import decode_image

    data = read_labelled(shards)
    kept, pixels = [], []
    for s in data.samples:
        try:
            pixels.append(preprocess(decode_image(s.image)))
            kept.append(s)
        except Exception:
            continue
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack(pixels), normalize=True)
        txt = model.encode_text(tokenizer([s.caption for s in kept]), normalize=True)
        classes = sorted({s.label for s in kept})
        classifier = build_zero_shot_classifier_legacy(model, tokenizer, classes, templates)

    def hits(scores: torch.Tensor, positive: torch.Tensor, k: int) -> float:
        got = 0
        for row, pos in zip(scores.tolist(), positive.tolist()):
            order = sorted(range(len(row)), key=lambda j: (-row[j], pos[j]))   # ties: negatives first
            got += next(i for i, j in enumerate(order) if pos[j]) < k
        return got / len(kept)

    same_caption = torch.tensor([[a.caption == b.caption for b in kept] for a in kept])
    labels = torch.tensor([classes.index(s.label) for s in kept])
    is_class = labels[:, None] == torch.arange(len(classes))[None, :]
    out = {}
    for k in (1, 5):
        out[f"eval/zeroshot_top{k}"] = hits(img @ classifier, is_class, k)
        out[f"eval/image_to_text_R@{k}"] = hits(img @ txt.T, same_caption, k)
        out[f"eval/text_to_image_R@{k}"] = hits(txt @ img.T, same_caption.T, k)
    return out


def test_metrics_equal_brute_force_with_duplicate_captions(synthetic_shards):
    model, preprocess, tokenizer = tiny_clip()
    model.train()
    ecfg = EvalConfig(shards=str(synthetic_shards), max_samples=None, batch_size=7, chunk_size=5)
    got = evaluate_clip(model, ecfg, DistInfo(), preprocess, tokenizer)
    assert model.training   # put back in its mode
    want = brute_force(model, str(synthetic_shards), preprocess, tokenizer, resolve_templates("simple"))
    assert {k: got[k] for k in METRICS} == pytest.approx(want, abs=1e-12)
    assert got["eval/samples"] == 64 and got["eval/classes"] == 16 and got["eval/skipped"] == 0
    assert 0 < got["eval/image_to_text_R@1"] < got["eval/image_to_text_R@5"] < 1   # not degenerate

    small = evaluate_clip(model, EvalConfig(shards=str(synthetic_shards), max_samples=20), DistInfo(),
                          preprocess, tokenizer)
    assert small["eval/samples"] == 20


def test_unique_captions_equal_open_clip_train(labelled_shards):
    """With unique captions and no exact ties, open_clip_train's own metrics are the reference."""
    from open_clip import build_zero_shot_classifier
    from open_clip_train.train import get_clip_metrics
    from pretrain.data import decode_image

    model, preprocess, tokenizer = tiny_clip(seed=3)
    templates = ["a photo of a {}.", "a drawing of the {}."]
    got = evaluate_clip(model, EvalConfig(shards=str(labelled_shards), batch_size=4, templates=templates,
                                          max_skipped_fraction=0.5),
                        DistInfo(), preprocess, tokenizer)
    assert got["eval/samples"] == 15 and got["eval/skipped"] == 3   # missing caption, bad JSON, bad image
    data = read_labelled(str(labelled_shards))
    assert len(data.samples) == 16 and dict(data.skipped) == {"missing_caption": 1, "bad_json": 1}
    labels = {s.key: s.label for s in data.samples}
    assert labels["nojson"] == "a red cross" and labels["noclass"] == "a blue cross"
    assert labels["k000"] == "red circle"
    assert got["eval/classes"] == 15   # 12 JSON classes + 3 named by their caption ("broken" was left out)

    kept = [s for s in data.samples if s.key != "badimage"]
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(decode_image(s.image)) for s in kept]), normalize=True)
        txt = model.encode_text(tokenizer([s.caption for s in kept]), normalize=True)
        classes = sorted({s.label for s in kept})
        classifier = build_zero_shot_classifier(model, tokenizer, classes, templates)
    ref = get_clip_metrics(img, txt, torch.tensor(1.0))
    target = torch.tensor([classes.index(s.label) for s in kept])
    top = (img @ classifier).topk(5, dim=1).indices   # open_clip_train.zero_shot.accuracy's rule
    top1, top5 = ((top[:, :k] == target[:, None]).any(dim=1).sum().item() for k in (1, 5))
    assert got["eval/image_to_text_R@1"] == pytest.approx(ref["image_to_text_R@1"])
    assert got["eval/image_to_text_R@5"] == pytest.approx(ref["image_to_text_R@5"])
    assert got["eval/text_to_image_R@1"] == pytest.approx(ref["text_to_image_R@1"])
    assert got["eval/text_to_image_R@5"] == pytest.approx(ref["text_to_image_R@5"])
    assert got["eval/zeroshot_top1"] == pytest.approx(top1 / 15)
    assert got["eval/zeroshot_top5"] == pytest.approx(top5 / 15)


def test_ties_count_against_the_model():
    same = torch.ones(4, 3) / 3 ** 0.5                      # a collapsed model: every score equal
    groups = torch.arange(4)
    assert count_hits(same, groups, same, groups, ks=(1, 3, 4)).tolist() == [0, 0, 4]
    dup = torch.tensor([0, 0, 1, 2])                        # candidates 0 and 1 are one caption
    assert count_hits(same, dup, same, dup, ks=(1, 3, 4)).tolist() == [0, 2, 4]


def test_count_hits_equals_brute_force_on_random_ties():
    g = torch.Generator().manual_seed(0)
    for trial in range(20):
        n, m, d = 13, int(torch.randint(3, 17, (1,), generator=g)), 3
        cand = torch.randint(-1, 2, (m, d), generator=g).float()     # few distinct values: many exact ties
        cand_groups = torch.randint(0, max(1, m // 2), (m,), generator=g)
        query_groups = cand_groups[torch.randint(0, m, (n,), generator=g)]
        queries = torch.randint(-1, 2, (n, d), generator=g).float()
        scores = queries @ cand.T
        for k in (1, 2, 5):
            want = 0
            for i in range(n):
                pos = cand_groups == query_groups[i]
                want += int((scores[i][~pos] >= scores[i][pos].max()).sum()) < k
            got = count_hits(queries, query_groups, cand, cand_groups, ks=(k,), chunk_size=1 + trial % 5)
            assert got.item() == want, (trial, k)


def test_config_errors(tmp_path, labelled_shards):
    model, preprocess, tokenizer = tiny_clip()
    with pytest.raises(BatonError, match=r"clip.eval.shards.*not found"):
        evaluate_clip(model, EvalConfig(shards=str(tmp_path / "nowhere.tar")), DistInfo(), preprocess, tokenizer)
    with pytest.raises(BatonError, match=r"clip.eval.templates"):
        evaluate_clip(model, EvalConfig(shards=str(labelled_shards), templates=["no slot"]), DistInfo(),
                      preprocess, tokenizer)
    with pytest.raises(BatonError, match=r"clip.eval.templates"):
        resolve_templates("imagenet")
    assert len(resolve_templates("openai")) == 80


@pytest.mark.slow
def test_pretraining_logs_the_evaluation(tmp_path, synthetic_shards):
    """`baton pretrain` with clip.eval.shards evaluates every train.eval_every steps and at the end, logging
    the metrics evaluate_clip gives for the model of that step."""
    from baton.checkpoint import load_checkpoint
    from baton.cli import main as cli_main
    from baton.logs import read_metrics
    from test_pretrain import write_tiny_config

    cfg = write_tiny_config(tmp_path / "c.yaml", tmp_path / "run", synthetic_shards,
                            train={"eval_every": 5, "checkpoint_every": 100})  # 8 steps
    assert cli_main(["pretrain", str(cfg), f"clip.eval.shards={synthetic_shards}", "clip.eval.max_samples=24"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in rows] == [5, 8]
    state, _ = load_checkpoint(tmp_path / "run")   # the step-8 model, evaluated again directly
    model, preprocess, tokenizer = tiny_clip()
    model.load_state_dict(state["model"])
    model.eval()
    direct = evaluate_clip(model, EvalConfig(shards=str(synthetic_shards), max_samples=24), DistInfo(), preprocess,
                           tokenizer)
    assert rows[-1]["eval/image_to_text_R@1"] == pytest.approx(direct["eval/image_to_text_R@1"])
    assert rows[-1]["eval/zeroshot_top5"] == pytest.approx(direct["eval/zeroshot_top5"])


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path, synthetic_shards, labelled_shards):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'tests'}"
           f"{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__, str(tmp_path), str(synthetic_shards), str(labelled_shards)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = _evaluations(DistInfo(), str(synthetic_shards), str(labelled_shards))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"result{rank}.json").read_text())
        scored = got.pop("scored")
        assert got == single, rank
        # Each rank scored only its own queries (63 samples: 32 on rank 0, 31 on rank 1), against all
        # 63 candidates, at most chunk_size=7 queries at a time: never the 63 x 63 matrix.
        assert max(q for q, _, _ in scored) == 32 - rank and max(c for _, c, _ in scored) == 63
        assert max(block for _, _, block in scored) <= 7 * 63


def _evaluations(info: DistInfo, synthetic: str, labelled: str) -> dict[str, dict[str, float]]:
    """The runs compared across world sizes: odd sample counts, a bad image on one rank, small chunks."""
    model, preprocess, tokenizer = tiny_clip()
    runs = {"synthetic": EvalConfig(shards=synthetic, max_samples=63, batch_size=8, chunk_size=7),
            "labelled": EvalConfig(shards=labelled, batch_size=3, chunk_size=2, templates="openai",
                                  max_skipped_fraction=0.5)}
    return {name: evaluate_clip(model, ecfg, info, preprocess, tokenizer) for name, ecfg in runs.items()}


def _worker(out: Path, synthetic: str, labelled: str) -> None:
    from baton.distributed import destroy, init_distributed

    import pretrain.clip.evaluation as evaluation

    info = init_distributed("cpu")
    scored, count_hits_ = [], evaluation.count_hits

    def spy(queries, query_groups, candidates, candidate_groups, ks, chunk_size):
        scored.append((queries.shape[0], candidates.shape[0], min(chunk_size, queries.shape[0]) * candidates.shape[0]))
        return count_hits_(queries, query_groups, candidates, candidate_groups, ks, chunk_size)

    evaluation.count_hits = spy
    result = {**_evaluations(info, synthetic, labelled), "scored": scored[:3]}   # the synthetic run's three
    (out / f"result{info.rank}.json").write_text(json.dumps(result))
    destroy()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
