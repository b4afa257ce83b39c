"""Losses and miners by class name, each with its own constructor arguments (`loss.name` +
`loss.kwargs`, `miner.name` + `miner.kwargs`).

A loss is baton's `softtriple` (finetune/losses/softtriple.py: SoftTriple with the centre
regulariser `tau` that pml's SoftTripleLoss lacks) or any pytorch-metric-learning loss class
(`MultiSimilarityLoss`, `ProxyAnchorLoss`, ...); a miner is any pml miner class. Each of baton's
losses owns the dataclass of its `loss.kwargs`, registered with it in `BATON_LOSSES` (a new one is
its file plus one line there); a pml class's constructor is its own schema. The short names of
the first releases (`multisimilarity`, `triplet`, `margin`; miners `multisimilarity`, `triplet`,
`distance`, `batchhard`) still resolve, to the classes they always meant.

Why every argument is checked here, against the constructor's signature (walked up the class
chain, since pml constructors pass `**kwargs` to their bases): a misspelt or misplaced argument
must stop the run when the config is loaded, naming the key and the accepted ones, not be
dropped (the loss then trains with a default the config.yaml does not show) nor surface as a
TypeError from a base class. `num_classes` / `embedding_size` (proxy and classifier losses) come
from the training data and the model, never from the config.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from dataclasses import dataclass
from typing import Any

from omegaconf import OmegaConf
from torch import nn

from baton.config import load_section
from baton.errors import BatonError
from baton.registry import Registry, resolve, unknown_name



@dataclass(frozen=True)
class LossSpec:
    """One of baton's own losses: the class, and the dataclass of its `loss.kwargs`."""
    loss: str     # "module:Class" of the nn.Module, built as Class(num_classes, embedding_dim, **kwargs)
    config: str   # "module:Class" of its arguments' dataclass (the fields are the constructor's keywords)


# baton's own losses, each with its config (the pml ones are found in the installed pml, by class
# name, and their constructors' signatures are their schema)
BATON_LOSSES = Registry("loss.name", {
    "softtriple": LossSpec("finetune.losses.softtriple:SoftTriple", "finetune.losses.softtriple:SoftTripleConfig"),
})
LOSS_ALIASES = {"multisimilarity": "MultiSimilarityLoss", "triplet": "TripletMarginLoss", "margin": "MarginLoss"}
MINER_ALIASES = {"multisimilarity": "MultiSimilarityMiner", "triplet": "TripletMarginMiner",
                 "distance": "DistanceWeightedMiner", "batchhard": "BatchHardMiner"}
# pml classes that are bases, or whose call is not loss(embeddings, labels) (VICReg needs ref_emb)
_NOT_LOSSES = {"BaseMetricLossFunction", "GenericPairLoss", "VICRegLoss"}
_NOT_MINERS = {"BaseMiner", "EmbeddingsAlreadyPackagedAsTriplets"}
# constructor argument -> what fills it (the names pml and baton use for the two sizes)
AUTO_ARGS = {"num_classes": "num_classes", "embedding_size": "embedding_dim", "embedding_dim": "embedding_dim",
             "descriptors_dim": "embedding_dim"}
# arguments that take a pml object: given in YAML as its class name, or {name: ..., kwargs: {...}}
_OBJECT_ARGS = {"distance": "distances", "reducer": "reducers", "embedding_regularizer": "regularizers",
                "weight_regularizer": "regularizers"}


def pml_losses() -> dict[str, type]:
    from pytorch_metric_learning import losses

    base = losses.BaseMetricLossFunction
    return {n: c for n, c in vars(losses).items()
            if inspect.isclass(c) and issubclass(c, base) and n not in _NOT_LOSSES}


def pml_miners() -> dict[str, type]:
    from pytorch_metric_learning import miners

    return {n: c for n, c in vars(miners).items()
            if inspect.isclass(c) and issubclass(c, miners.BaseMiner) and n not in _NOT_MINERS}


def _unknown(kind: str, name: str, known: list[str], aliases: dict[str, str]) -> BatonError:
    return unknown_name(f"{kind}.name", name, known, f" (short names: {', '.join(aliases)})", also=aliases)


def loss_class(name: str) -> type:
    """The class `loss.name` names: baton's own, an alias, or a pml loss class."""
    if name in BATON_LOSSES:
        return resolve(BATON_LOSSES[name].loss)
    found = pml_losses()
    cls = found.get(LOSS_ALIASES.get(name, name))
    if cls is None:
        raise _unknown("loss", name, [*BATON_LOSSES, *sorted(found)], LOSS_ALIASES)
    return cls


def loss_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`loss.kwargs` as the run records them: for one of baton's losses, its config dataclass filled
    from them (every argument, the defaults included; an unknown key, a wrong type or a value out
    of range refused, naming `loss.kwargs.KEY`); for a pml loss, as given (checked in `check_args`)."""
    if name not in BATON_LOSSES:
        return dict(kwargs)
    section = resolve(BATON_LOSSES[name].config)
    node = OmegaConf.create({"loss": {"kwargs": dict(kwargs)}})
    return dataclasses.asdict(load_section(section, "loss.kwargs", [node], f"loss.name={name}"))


def miner_class(name: str) -> type:
    found = pml_miners()
    cls = found.get(MINER_ALIASES.get(name, name))
    if cls is None:
        raise _unknown("miner", name, sorted(found), MINER_ALIASES)
    return cls


def constructor_args(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword arguments `cls(...)` accepts: its `__init__`'s, then its bases' for as long as
    each passes `**kwargs` on (pml's cooperative constructors). A base's argument without a
    default is one the subclass fills itself (GenericPairLoss's mat_based_loss), so it is left out
    unless it is a size baton fills (CosFaceLoss passes `*args` on to num_classes, embedding_size)."""
    args: dict[str, inspect.Parameter] = {}
    own = True
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        init = vars(klass).get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                continue
            if own or p.default is not p.empty or p.name in AUTO_ARGS:
                args.setdefault(p.name, p)
        own = False
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return args


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_args(cls: type, kwargs: dict[str, Any], key: str) -> None:
    """Every entry of `kwargs` is a constructor argument of `cls` of a plausible type, and every
    required argument is given; otherwise a BatonError names `key.ARG` and the accepted arguments."""
    accepted = constructor_args(cls)
    own = sorted(a for a in accepted if a not in AUTO_ARGS)
    auto = [a for a in accepted if a in AUTO_ARGS]
    takes = f"{cls.__name__} takes: {', '.join(own) or 'no arguments'}" + \
            (f" ({', '.join(auto)}: set from the data and the model)" if auto else "")
    for arg, value in kwargs.items():
        if arg in AUTO_ARGS and arg in accepted:
            raise BatonError(f"{key}.{arg}: {arg} is set from the training data and the model, not the "
                             f"config; remove it")
        if arg not in accepted:
            hint = difflib.get_close_matches(arg, own, n=1)
            raise BatonError(f"{key}.{arg}: {cls.__name__} has no argument '{arg}'" +
                             (f" (did you mean '{hint[0]}'?)" if hint else "") + f". {takes}")
        default = accepted[arg].default
        if default is inspect.Parameter.empty or default is None or arg in _OBJECT_ARGS:
            continue
        if (isinstance(default, bool) and not isinstance(value, bool)) or \
                (_is_number(default) and not _is_number(value)):
            raise BatonError(f"{key}.{arg}={value!r}: {cls.__name__} expects a {type(default).__name__} "
                             f"like its default {default!r}")
    missing = [a for a, p in accepted.items()
               if p.default is inspect.Parameter.empty and a not in AUTO_ARGS and a not in kwargs]
    if missing:
        raise BatonError(f"{cls.__name__} needs {', '.join(f'{key}.{a}' for a in missing)}. {takes}")


def _pml_object(arg: str, spec: Any, key: str) -> Any:
    """A distance / reducer / regularizer argument from its YAML form (a class name, or a mapping
    with `name` and `kwargs`) to the pml object."""
    import importlib

    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or set(spec) - {"name", "kwargs"} or "name" not in spec:
        raise BatonError(f"{key}.{arg}: give a pml class name or {{name: ..., kwargs: {{...}}}}, not {spec!r}")
    module = importlib.import_module(f"pytorch_metric_learning.{_OBJECT_ARGS[arg]}")
    cls = getattr(module, str(spec["name"]), None)
    if not inspect.isclass(cls):
        names = sorted(n for n, c in vars(module).items() if inspect.isclass(c) and not n.startswith("Base"))
        raise unknown_name(f"{key}.{arg}", spec["name"], names, f" (the classes of pml.{_OBJECT_ARGS[arg]})")
    kwargs = dict(spec.get("kwargs") or {})
    check_args(cls, kwargs, f"{key}.{arg}.kwargs")
    return cls(**kwargs)


def _build(cls: type, kwargs: dict[str, Any], key: str, sizes: dict[str, int]) -> nn.Module:
    check_args(cls, kwargs, key)
    built = {a: (_pml_object(a, v, key) if a in _OBJECT_ARGS and isinstance(v, (str, dict)) else v)
             for a, v in kwargs.items()}
    accepted = constructor_args(cls)
    for arg, size in AUTO_ARGS.items():
        if arg in accepted and sizes.get(size) is not None:
            built[arg] = sizes[size]
    try:
        return cls(**built)
    except (TypeError, ValueError, AssertionError) as e:  # a value the class itself refuses
        raise BatonError(f"{key}: {cls.__name__}({', '.join(f'{a}={v!r}' for a, v in kwargs.items())}) "
                         f"refused: {e}") from None


def check_loss_and_miner(loss_name: str, kwargs: dict, miner_name: str,
                         miner_kwargs: dict) -> tuple[str, dict[str, Any], str]:
    """What `build_loss` would refuse, found when the config is loaded (by building both with
    stand-in sizes, under a forked RNG); returns the loss's name (a pml alias resolved to its
    class name), its kwargs as the run records them (`loss_kwargs`) and the miner's class name
    ("" for none)."""
    import torch

    cls = loss_class(loss_name)
    kwargs = loss_kwargs(loss_name, kwargs)
    with torch.random.fork_rng(devices=[]):
        _build(cls, dict(kwargs), "loss.kwargs", {"num_classes": 2, "embedding_dim": 2})
    name = loss_name if loss_name in BATON_LOSSES else cls.__name__
    if not miner_name:
        if miner_kwargs:
            raise BatonError(f"miner.kwargs ({', '.join(miner_kwargs)}) set without miner.name; they would "
                             f"reach no miner")
        return name, kwargs, ""
    if loss_name in BATON_LOSSES:
        raise BatonError(f"miner.name does not apply to loss.name={loss_name} (it sees every class's "
                         f"centres, no mined pairs); set miner.name ''")
    mcls = miner_class(miner_name)
    _build(mcls, dict(miner_kwargs), "miner.kwargs", {})
    return name, kwargs, mcls.__name__


class MinedLoss(nn.Module):
    """A pml loss fed the tuples its miner picks from the batch."""

    def __init__(self, loss: nn.Module, miner: nn.Module):
        super().__init__()
        self.loss, self.miner = loss, miner

    def forward(self, embeddings, labels):
        return self.loss(embeddings, labels, self.miner(embeddings, labels))


def build_loss(name: str, num_classes: int, embedding_dim: int, kwargs: dict[str, Any] | None = None,
               miner: str = "", miner_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The loss `name` built with `kwargs` (+ the sizes it takes), wrapped with the miner if any;
    called as `loss(embeddings, labels)`."""
    _, kwargs, _ = check_loss_and_miner(name, dict(kwargs or {}), miner, dict(miner_kwargs or {}))
    miner_kwargs = dict(miner_kwargs or {})
    sizes = {"num_classes": num_classes, "embedding_dim": embedding_dim}
    loss = _build(loss_class(name), kwargs, "loss.kwargs", sizes)
    if not miner:
        return loss
    return MinedLoss(loss, _build(miner_class(miner), miner_kwargs, "miner.kwargs", {}))
