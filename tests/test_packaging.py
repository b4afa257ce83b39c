"""What `pip install` gives: the recipes (the repository's configs/, mapped onto baton/configs by
pyproject.toml) and sbatch templates ship in the wheel (`baton recipes` lists and copies them, from
a checkout as from the installed wheel), faiss is an extra (faiss-cpu or faiss-gpu, never both),
and s3fs too."""

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
PACKAGES = ("baton", "data_prep", "pretrain", "finetune", "slurm")
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
            shutil.copytree(ROOT / name, src / name,
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


@pytest.mark.slow   # builds the wheel
def test_the_wheel_holds_every_module_of_the_source(wheel):
    """pyproject.toml lists the packages by hand (the configs/ mapping needs it): a package left out
    of that list would be missing from the wheel, and this names it."""
    names = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    source = {p.relative_to(ROOT).as_posix() for name in PACKAGES for p in (ROOT / name).rglob("*.py")
              if "__pycache__" not in p.parts}
    assert sorted(source - names) == [] and sorted(names - source) == []


def test_a_checkout_finds_the_recipes_in_its_configs_folder():
    """No link baton/configs in the repository: from a checkout the recipes are its top-level
    configs/ (the one copy, which the tests and README name)."""
    from baton import recipes

    assert not (ROOT / "baton" / "configs").exists()
    assert recipes.folder("recipe") == ROOT / "configs"
    assert recipes.folder("template") == ROOT / "slurm" / "templates"
    assert sorted(f.name for f in recipes.packaged_files() if f.kind == "recipe") == RECIPES


def test_a_package_with_neither_wheel_nor_checkout_recipes_says_so(tmp_path, monkeypatch):
    from baton import recipes

    (tmp_path / "baton").mkdir()   # a bare baton package: no configs/ in it, no repository beside it
    monkeypatch.setattr(recipes.resources, "files", lambda package: tmp_path / package)
    with pytest.raises(BatonError, match=r"the packaged recipes are missing: neither .*baton/configs "
                                         r"\(an installed wheel\) nor .*configs \(a source checkout\)"):
        recipes.folder("recipe")
    (tmp_path / "configs").mkdir()   # a configs/ folder alone is not a checkout: no pyproject.toml
    with pytest.raises(BatonError, match="the packaged recipes are missing"):
        recipes.folder("recipe")
    (tmp_path / "pyproject.toml").write_text("")
    assert recipes.folder("recipe") == tmp_path / "configs"


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


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed by pip (`pip install --no-deps --target SITE`: the dependencies are this
    interpreter's), console script included (SITE/bin/baton)."""
    site = tmp_path_factory.mktemp("installed") / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                    "--disable-pip-version-check", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return site


def _outside(site: Path) -> dict:
    """The environment of a process that must import the installed baton, not the repository's."""
    return {**os.environ, "PYTHONPATH": str(site)}


@pytest.mark.slow   # the wheel, pip install, the console script in a fresh process
def test_the_installed_console_script_lists_and_copies_a_recipe_byte_for_byte(installed, tmp_path):
    """Away from the repository, `baton recipes` of the pip-installed wheel lists every recipe from
    the installed baton/configs, and `baton recipes copy NAME DEST` writes the repository's file."""
    script = installed / "bin" / "baton"
    assert script.is_file()
    work = tmp_path / "work"
    work.mkdir()
    listed = subprocess.run([str(script), "recipes"], cwd=work, env=_outside(installed),
                            capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert f"recipes ({installed / 'baton' / 'configs'}):" in listed.stdout
    listed_names = [line.split()[0] for line in listed.stdout.split("templates (")[0].splitlines()[1:] if line.strip()]
    assert listed_names == RECIPES
    copied = subprocess.run([str(script), "recipes", "copy", "demo_clip", "mine"], cwd=work,
                            env=_outside(installed), capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr[-3000:]
    assert copied.stdout.split() == [str(Path("mine") / "demo_clip.yaml")]
    assert (work / "mine" / "demo_clip.yaml").read_bytes() == (ROOT / "configs" / "demo_clip.yaml").read_bytes()


@pytest.mark.slow   # the wheel, and a fresh interpreter that imports the finetune stage
def test_installed_from_the_wheel_baton_recipes_copies_a_recipe_that_loads(installed, tmp_path):
    """Installed by pip, away from the repository: `baton recipes` lists the packaged files, `copy`
    brings a recipe with its `base:` chain, and the copy resolves (--print-config)."""
    site = installed
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run([sys.executable, "-c", INSTALLED_STEPS], cwd=work, env=_outside(site),
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
