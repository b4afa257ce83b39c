"""What `pip install` gives: the recipes and sbatch templates ship in the wheel (`baton recipes`
lists and copies them), faiss is an extra (faiss-cpu or faiss-gpu, never both), and s3fs too."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from baton.cli import main as baton_main
from baton.errors import BatonError

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ("pyproject.toml", "README.md", "configs", "baton", "data_prep", "pretrain", "finetune", "slurm")
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
TEMPLATES = sorted(p.name for p in (ROOT / "slurm" / "templates").glob("*.sbatch"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel --no-deps --no-build-isolation .` builds from a copy of the repository."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCE:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, symlinks=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", ".", "-w", str(tmp / "dist")],
                   cwd=src, check=True, capture_output=True)
    (found,) = (tmp / "dist").glob("baton-*.whl")
    return found


@pytest.mark.slow   # builds the wheel (pip wheel: ~5 s of CPU)
def test_the_wheel_holds_every_recipe_and_template_and_no_hard_faiss(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n.split("/")[-1] for n in names if n.startswith("baton/configs/")) == RECIPES
    assert sorted(n.split("/")[-1] for n in names if n.startswith("slurm/templates/")) == TEMPLATES
    (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(zipfile.ZipFile(wheel).read(meta_name).decode())
    requires = meta.get_all("Requires-Dist")
    hard = [r for r in requires if "extra ==" not in r]
    assert not [r for r in hard if r.startswith(("faiss", "s3fs"))], hard
    for extra, package in (("faiss-cpu", "faiss-cpu"), ("faiss-gpu", "faiss-gpu"), ("s3", "s3fs")):
        assert any(r.startswith(package) and f'extra == "{extra}"' in r for r in requires), (extra, requires)


def test_no_extra_installs_both_faiss_packages():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name, packages in extras.items():
        faiss = {p for p in packages if p.startswith("faiss")}
        assert len(faiss) <= 1, (name, faiss)


# Run in a fresh interpreter beside the unpacked wheel: one process for every step (each start
# imports torch), printing each step's output between markers.
INSTALLED_STEPS = """
import contextlib, io, sys
import baton
from baton.cli import main
print(baton.__file__)
for argv in (["recipes"], ["recipes", "copy", "demo_softtriple_elg", "mine"],
             ["finetune", "mine/demo_softtriple_elg.yaml", "--print-config", "train.epochs=1"],
             ["recipes", "copy", "stage.sbatch", "mine"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(argv) == 0, argv
    print("@@@" + out.getvalue(), end="")
"""


@pytest.mark.slow   # the wheel, and a fresh interpreter that imports the finetune stage
def test_installed_from_the_wheel_baton_recipes_copies_a_recipe_that_loads(wheel, tmp_path):
    """Unpacked as pip installs it, away from the repository: `baton recipes` lists the packaged
    files, `copy` brings a recipe with its `base:` chain, and the copy resolves (--print-config)."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", INSTALLED_STEPS], cwd=work, env={**os.environ, "PYTHONPATH": str(site)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    where, listing, copied, resolved, _ = done.stdout.split("@@@")
    assert where.startswith(str(site / "baton")), where  # the wheel's baton, not the repository's
    for name in RECIPES + TEMPLATES:
        assert name in listing
    assert str(site / "baton" / "configs") in listing
    assert sorted(Path(p).name for p in copied.split()) == ["demo_softtriple.yaml", "demo_softtriple_elg.yaml"]
    resolved = OmegaConf.create(resolved)
    assert resolved.language.mode == "elg" and resolved.train.epochs == 1
    assert resolved.loss.name == OmegaConf.load(ROOT / "configs" / "demo_softtriple.yaml").loss.name
    assert (work / "mine" / "stage.sbatch").read_text() == (ROOT / "slurm" / "templates" / "stage.sbatch").read_text()


def test_recipes_copy_refuses_to_overwrite_and_copies_all(tmp_path, capsys):
    assert baton_main(["recipes", "copy", "demo_clip.yaml", str(tmp_path)]) == 0
    edited = tmp_path / "demo_clip.yaml"
    edited.write_text("# mine\n")
    assert baton_main(["recipes", "copy", "demo_clip", str(tmp_path)]) == 2   # a BatonError, one line
    assert "demo_clip.yaml already exists: pass --force" in capsys.readouterr().err
    assert edited.read_text() == "# mine\n"
    assert baton_main(["recipes", "copy", "demo_clip", str(tmp_path), "--force"]) == 0
    assert edited.read_bytes() == (ROOT / "configs" / "demo_clip.yaml").read_bytes()
    assert baton_main(["recipes", "copy", "all", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == sorted(RECIPES + TEMPLATES)
    assert baton_main(["recipes", "copy", "demo_sofftriple", str(tmp_path)]) == 2
    assert "did you mean 'demo_softtriple.yaml'" in capsys.readouterr().err


def test_a_missing_faiss_names_its_extras(monkeypatch, tmp_path):
    import numpy as np

    from finetune.evaluate import retrieval_metrics
    from finetune.evaluate_cli import main as evaluate_main

    monkeypatch.setitem(sys.modules, "faiss", None)   # `import faiss` raises ImportError
    with pytest.raises(BatonError, match=r"faiss is not installed.*pip install 'baton\[faiss-cpu\]' or "
                                         r"pip install 'baton\[faiss-gpu\]'"):
        retrieval_metrics(np.eye(4, dtype=np.float32), np.array([0, 0, 1, 1]))
    # `baton evaluate` says so before reading the data or building the model
    with pytest.raises(BatonError, match=r"^baton evaluate: faiss is not installed"):
        evaluate_main(["pixels", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])


def test_a_missing_s3fs_on_an_s3_url_names_the_s3_extra(monkeypatch):
    from baton.remote import open_url
    from pretrain.data.sources import resolve_shards

    monkeypatch.setitem(sys.modules, "s3fs", None)
    for read in (lambda: open_url("s3://bucket/shards/stats.json").open(),
                 lambda: resolve_shards("s3://bucket/shards/"),
                 lambda: resolve_shards("s3://bucket/shards/shard-{000000..000003}.tar")):
        with pytest.raises(BatonError, match=r"reading s3://bucket/shards/.*s3fs is not installed.*"
                                             r"pip install 'baton\[s3\]'"):
            read()
