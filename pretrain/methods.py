"""The pretraining methods, one line each: name -> where its `PretrainMethod` and its config are.

A method lives in its own folder (`pretrain/clip/`, `pretrain/dino/`): the method class (the
contract in `pretrain/method.py`) and the dataclass of its config section, which a recipe spells
under the method's name (`method: dino` + `dino: {...}`; `baton.config.ChosenSection`). Adding a
method is that folder plus one line here. Entries are "module:attr" strings, imported only when
used, so loading a config imports the config modules and not the models behind them.
"""

from __future__ import annotations

from dataclasses import dataclass

from baton.registry import Registry, resolve


@dataclass(frozen=True)
class MethodSpec:
    method: str   # "module:Class" of its PretrainMethod
    config: str   # "module:Class" of its config section's dataclass


METHODS = Registry("method", {
    "clip": MethodSpec("pretrain.clip.method:ClipMethod", "pretrain.clip.config:ClipConfig"),
    "dino": MethodSpec("pretrain.dino.method:DinoMethod", "pretrain.dino.config:DinoConfig"),
    "glip": MethodSpec("pretrain.glip.method:GlipMethod", "pretrain.glip.config:GlipConfig"),
})


def method_sections() -> dict[str, type]:
    """{method name: its config section's dataclass}: what `PretrainConfig.CHOSEN_SECTION` reads."""
    return {name: resolve(METHODS[name].config) for name in METHODS}
