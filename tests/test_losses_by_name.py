"""Losses and miners by class name with their own arguments (`loss.name` + `loss.kwargs`,
`miner.name` + `miner.kwargs`), checked against pytorch-metric-learning's own objects."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import distances, losses, miners

from baton.config import load_config, to_yaml
from baton.errors import BatonError
from baton.run import config_changes
from finetune.config import FinetuneConfig
from finetune.losses import MinedLoss, SoftTriple, build_loss
from finetune.model import EmbeddingModel
from finetune.train import param_groups

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def batch(n_classes=6, per_class=4, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(n_classes * per_class, dim, generator=g), dim=1)
    return x, torch.arange(n_classes).repeat(per_class)


def built(overrides: list[str], n_classes=6, dim=16, recipe=None):
    cfg = load_config(FinetuneConfig, recipe, overrides)
    return cfg, build_loss(cfg.loss.name, n_classes, dim, cfg.loss.kwargs, cfg.miner.name, cfg.miner.kwargs)


def test_a_pml_loss_by_name_with_kwargs_equals_pmls_own_object():
    x, y = batch()
    cfg, loss = built(["loss.name=MultiSimilarityLoss", "loss.kwargs.alpha=2", "loss.kwargs.beta=40",
                       "loss.kwargs.base=0.5"])
    want = losses.MultiSimilarityLoss(alpha=2, beta=40, base=0.5)(x, y)
    assert cfg.loss.kwargs == {"alpha": 2, "beta": 40, "base": 0.5}
    assert torch.allclose(loss(x, y), want)
    assert not torch.allclose(want, losses.MultiSimilarityLoss()(x, y))  # beta 40 is not pml's default 50


def test_object_arguments_by_class_name():
    x, y = batch()
    _, loss = built(["loss.name=ContrastiveLoss", "loss.kwargs.distance=CosineSimilarity",
                     "loss.kwargs.pos_margin=1", "loss.kwargs.neg_margin=0"])
    want = losses.ContrastiveLoss(pos_margin=1, neg_margin=0, distance=distances.CosineSimilarity())(x, y)
    assert isinstance(loss.distance, distances.CosineSimilarity) and torch.allclose(loss(x, y), want)

    with pytest.raises(BatonError, match=r"^unknown loss.kwargs.distance 'CosineSimilarty' \(did you mean "
                                         r"'CosineSimilarity'\?\): choose one of .*CosineSimilarity.* "
                                         r"\(the classes of pml.distances\)$"):
        built(["loss.name=ContrastiveLoss", "loss.kwargs.distance=CosineSimilarty"])

def test_proxy_losses_get_sizes_from_the_data_and_train_at_loss_lr():
    x, y = batch(n_classes=6, dim=16)
    torch.manual_seed(3)
    _, loss = built(["loss.name=ProxyAnchorLoss", "loss.kwargs.margin=0.2", "loss.kwargs.alpha=16"])
    torch.manual_seed(3)
    ref = losses.ProxyAnchorLoss(num_classes=6, embedding_size=16, margin=0.2, alpha=16)
    assert loss.proxies.shape == (6, 16) and torch.equal(loss.proxies, ref.proxies)
    assert torch.allclose(loss(x, y), ref(x, y))
    model = EmbeddingModel(torch.nn.Linear(16, 16), 16, None)
    cfg = load_config(FinetuneConfig, None, ["optim.loss_lr=0.5"])
    groups = param_groups(model, loss, cfg.optim)
    assert [g["lr"] for g in groups if any(p is loss.proxies for p in g["params"])] == [0.5]
    with pytest.raises(BatonError, match="loss.kwargs.num_classes.*set from the training data"):
        load_config(FinetuneConfig, None, ["loss.name=ArcFaceLoss", "loss.kwargs.num_classes=10"])


@pytest.mark.parametrize("overrides, named", [
    (["loss.name=MultiSimilarityLoss", "loss.kwargs.bta=40"], "loss.kwargs.bta"),
    (["loss.kwargs.K=4"], "loss.kwargs.K"),  # baton's SoftTriple under the same check
    (["loss.name=TripletMarginLoss", "miner.name=TripletMarginMiner", "miner.kwargs.epsilon=0.1"],
     "miner.kwargs.epsilon"),
])
def test_a_wrong_kwarg_is_refused_naming_it_and_the_accepted_ones(overrides, named):
    with pytest.raises(BatonError) as err:
        load_config(FinetuneConfig, None, overrides)
    msg = str(err.value)
    # pml's classes list their constructor's arguments; baton's losses their config dataclass's fields
    assert named in msg and ("takes:" in msg or "Valid keys here: centers_per_class, gamma, la, margin, tau" in msg)
    if "bta" in named:
        assert "did you mean 'beta'" in msg and "alpha, base, beta" in msg


def test_bad_values_and_names_are_refused_when_the_config_is_loaded():
    with pytest.raises(BatonError, match="loss.kwargs.margin='wide'.*expects a float"):
        load_config(FinetuneConfig, None, ["loss.name=TripletMarginLoss", "loss.kwargs.margin=wide"])
    with pytest.raises(BatonError, match="unknown loss.name 'MultiSimilarity'.*did you mean 'MultiSimilarityLoss'"):
        load_config(FinetuneConfig, None, ["loss.name=MultiSimilarity"])
    with pytest.raises(BatonError, match="needs loss.kwargs.margin, loss.kwargs.Tn"):
        load_config(FinetuneConfig, None, ["loss.name=RankedListLoss"])
    with pytest.raises(BatonError, match="loss.kwargs.gamma=0.0 is out of range: it must be > 0"):
        load_config(FinetuneConfig, None, ["loss.kwargs.gamma=0"])
    with pytest.raises(BatonError, match="loss.name=softtriple: bad value for config key 'loss.kwargs.la'"):
        load_config(FinetuneConfig, None, ["loss.kwargs.la=wide"])
    with pytest.raises(BatonError, match="miner.name does not apply to loss.name=softtriple"):
        load_config(FinetuneConfig, None, ["miner.name=BatchHardMiner"])
    with pytest.raises(BatonError, match="miner.kwargs .* without miner.name"):
        load_config(FinetuneConfig, None, ["loss.name=TripletMarginLoss", "miner.kwargs.margin=0.1"])


def test_a_miner_by_name_with_kwargs_reaches_the_loss():
    x, y = batch()
    cfg, loss = built(["loss.name=TripletMarginLoss", "loss.kwargs.margin=0.1", "miner.name=TripletMarginMiner",
                       "miner.kwargs.margin=0.05", "miner.kwargs.type_of_triplets=hard"])
    assert isinstance(loss, MinedLoss) and loss.miner.margin == 0.05 and loss.miner.type_of_triplets == "hard"
    ref_loss = losses.TripletMarginLoss(margin=0.1)
    mined = miners.TripletMarginMiner(margin=0.05, type_of_triplets="hard")(x, y)
    assert 0 < len(mined[0]) < len(miners.TripletMarginMiner(type_of_triplets="all")(x, y)[0])
    assert torch.allclose(loss(x, y), ref_loss(x, y, mined))
    assert not torch.allclose(loss(x, y), ref_loss(x, y))  # the mined triplets, not all of them


def test_loss_margin_with_triplet_changes_the_margin():
    """The first releases recorded `loss.margin=0.5` in config.yaml and ran pml's 0.05."""
    x, y = batch()
    cfg, loss = built(["loss.name=triplet", "loss.margin=0.5"])
    assert cfg.loss.name == "TripletMarginLoss" and cfg.loss.kwargs == {"margin": 0.5}
    assert loss.margin == 0.5
    assert torch.allclose(loss(x, y), losses.TripletMarginLoss(margin=0.5)(x, y))
    assert not torch.allclose(loss(x, y), losses.TripletMarginLoss()(x, y))
    assert "margin: 0.5" in to_yaml(cfg)


def test_the_multisimilarity_recipes_run_the_papers_2_40_05():
    for name in ("cub200", "cars196", "sop"):
        cfg, loss = built([], recipe=CONFIGS / f"{name}_multisimilarity_plg.yaml")
        assert (loss.loss.alpha, loss.loss.beta, loss.loss.base) == (2, 40, 0.5)
        assert isinstance(loss.miner, miners.MultiSimilarityMiner) and loss.miner.epsilon == 0.1


def test_softtriple_keys_old_and_new_spellings(tmp_path):
    x, y = batch()
    new = CONFIGS / "demo_softtriple.yaml"
    cfg, loss = built([], recipe=new)
    assert isinstance(loss, SoftTriple) and (loss.K, loss.tau) == (4, 0.0)
    old = tmp_path / "old.yaml"  # a recipe of the first releases: SoftTriple's keys flat, loss.miner
    old.write_text("loss:\n  name: softtriple\n  centers_per_class: 4\n  la: 20.0\n  gamma: 0.1\n"
                   "  tau: 0.0\n  margin: 0.01\n  miner: ''\n")
    old_cfg = load_config(FinetuneConfig, old)
    assert old_cfg.loss == cfg.loss and old_cfg.miner.name == ""
    assert load_config(FinetuneConfig, old, ["loss.tau=0.3"]).loss.kwargs["tau"] == 0.3
    both = tmp_path / "both.yaml"
    both.write_text("loss:\n  la: 10.0\n  kwargs:\n    la: 20.0\n")
    with pytest.raises(BatonError, match="'loss.la' is the old spelling of 'loss.kwargs.la'"):
        load_config(FinetuneConfig, both)
    # a run saved with the old keys resumes with the new ones without a reported change
    saved = to_yaml(cfg).replace("  kwargs:\n    centers_per_class: 4\n    la: 20.0\n    gamma: 0.1\n"
                                 "    tau: 0.0\n    margin: 0.01\n",
                                 "  centers_per_class: 4\n  la: 20.0\n  gamma: 0.1\n  tau: 0.0\n  margin: 0.01\n")
    assert "centers_per_class: 4\n  la" in saved
    assert not [c for c in config_changes(saved, cfg) if c.startswith("loss")]


def test_a_dict_override_replaces_the_arguments_a_recipe_set():
    cfg, loss = built(["loss.name=MultiSimilarityLoss", "loss.kwargs={}", "loss.kwargs.beta=40"],
                      recipe=CONFIGS / "demo_softtriple.yaml")
    assert cfg.loss.kwargs == {"beta": 40} and loss.beta == 40
    with pytest.raises(BatonError, match="loss.kwargs.centers_per_class: MultiSimilarityLoss has no argument"):
        load_config(FinetuneConfig, CONFIGS / "demo_softtriple.yaml", ["loss.name=MultiSimilarityLoss"])


def test_baton_losses_own_a_config_dataclass_that_is_their_constructor_and_is_recorded():
    """Each of baton's losses registers the dataclass of its `loss.kwargs`: its fields are the
    constructor's keywords with the same defaults, and a run's config.yaml records every one of them
    (a default the recipe left unset included), so the run directory says what the loss trained with."""
    import dataclasses
    import inspect

    from finetune.losses.registry import BATON_LOSSES, loss_class
    from baton.registry import resolve

    for name in BATON_LOSSES:
        section = resolve(BATON_LOSSES[name].config)
        params = {p.name: p.default for p in list(inspect.signature(loss_class(name)).parameters.values())[2:]}
        assert {f.name: f.default for f in dataclasses.fields(section)} == params, name
    torch.manual_seed(0)
    cfg, loss = built(["loss.kwargs.la=15"])
    assert cfg.loss.kwargs == {"centers_per_class": 10, "la": 15.0, "gamma": 0.1, "tau": 0.2, "margin": 0.01}
    assert (loss.K, loss.la, loss.tau) == (10, 15.0, 0.2)
    assert "  kwargs:\n    centers_per_class: 10\n    la: 15.0\n    gamma: 0.1\n    tau: 0.2\n" in to_yaml(cfg)
    x, y = batch()
    torch.manual_seed(0)
    want = SoftTriple(6, 16, la=15.0)
    assert torch.equal(loss.centers, want.centers) and torch.equal(loss(x, y), want(x, y))
    assert cfg.loss == load_config(FinetuneConfig, None, ["loss.kwargs.la=15.0"]).loss
