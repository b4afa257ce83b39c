"""`baton recipes`: the recipes (`configs/*.yaml`) and sbatch templates that ship with the package.

    baton recipes                       list them, each with the first line of its comment
    baton recipes copy NAME [DEST]      copy one (and the recipes its `base:` chain names) into DEST
    baton recipes copy all [DEST]       copy every recipe and template into DEST (default: .)

A `pip install`ed baton has no repository beside it, so the recipes travel as package data: the
repository's top-level `configs/` is the one copy, which pyproject.toml's package-dir maps onto
`baton/configs/` of the wheel; the templates are `slurm/templates/` of the `slurm` package. So the
recipes are looked for beside the imported `baton` package first (a wheel), then in the checkout
`baton` was imported from (a source tree or an editable install). A copy never overwrites a file
unless `--force` is given: a copied recipe is the user's to edit.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from baton.errors import BatonError

# kind -> (package, folder in it, file suffix)
KINDS = {"recipe": ("baton", "configs", ".yaml"), "template": ("slurm", "templates", ".sbatch")}
ALL = "all"
# kind -> its folder at the top of a source checkout, where it is not inside its package
CHECKOUT_FOLDERS = {"recipe": "configs"}


@dataclass(frozen=True)
class Packaged:
    name: str          # the file name, e.g. demo_clip.yaml
    kind: str          # recipe | template
    path: Path         # where the installed package holds it

    @property
    def summary(self) -> str:
        """The first comment line of the file (after a shebang), '' when it has none."""
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if line.startswith("#!"):
                continue
            return line.lstrip("#").strip() if line.startswith("#") else ""
        return ""


def folder(kind: str) -> Path:
    """The directory that holds one kind of packaged file: inside the imported package (a wheel),
    else, for the recipes, the `configs/` of the checkout that package comes from."""
    package, sub, _ = KINDS[kind]
    root = Path(str(resources.files(package)))
    if (root / sub).is_dir():
        return root / sub
    # A checkout: the package is <repo>/<package>/ and the recipes are <repo>/configs/, which only
    # the wheel build maps into the package. pyproject.toml beside it says this is baton's repository.
    checkout = root.parent / CHECKOUT_FOLDERS.get(kind, sub)
    if kind in CHECKOUT_FOLDERS and checkout.is_dir() and (root.parent / "pyproject.toml").is_file():
        return checkout
    raise BatonError(f"the packaged {kind}s are missing: neither {root / sub} (an installed wheel) nor "
                     f"{checkout} (a source checkout) exists; reinstall baton (pip install baton, or "
                     f"pip install -e . in the repository)")


def packaged_files() -> list[Packaged]:
    """Every recipe, then every template, by name."""
    found = []
    for kind, (_, _, suffix) in KINDS.items():
        d = folder(kind)
        found += [Packaged(p.name, kind, p) for p in sorted(d.glob(f"*{suffix}")) if p.is_file()]
    return found


def find(name: str) -> Packaged:
    """A packaged file by its name, with or without its suffix (`demo_clip` or `demo_clip.yaml`)."""
    files = packaged_files()
    for f in files:
        if name in (f.name, f.path.stem):
            return f
    from baton.registry import unknown_name

    raise unknown_name("recipe or template", name, [f.name for f in files] + [ALL],
                       extra=" (`baton recipes` lists them)")


def with_bases(f: Packaged) -> list[Packaged]:
    """`f` and the packaged recipes its `base:` chain names (relative to the recipe's folder)."""
    from baton.config import BASE_KEY, read_yaml

    chain, seen = [f], {f.name}
    while chain[-1].kind == "recipe":
        node = read_yaml(chain[-1].path)
        base = node.get(BASE_KEY) if hasattr(node, "get") else None
        if not isinstance(base, str) or Path(base).name in seen:
            break
        if Path(base).parent != Path("."):
            raise BatonError(f"packaged recipe {chain[-1].name}: `base: {base}` is not a recipe of the same folder")
        chain.append(find(base))
        seen.add(chain[-1].name)
    return chain


def copy(names: list[Packaged], dest: Path, force: bool = False) -> list[Path]:
    """Copy the files into `dest` (created); refuses, before copying anything, to overwrite a file
    unless `force`."""
    targets = [(f, dest / f.name) for f in names]
    existing = [str(t) for f, t in targets if t.exists() and not force]
    if existing:
        raise BatonError(f"{', '.join(existing)} already exist{'s' if len(existing) == 1 else ''}: "
                         f"pass --force to overwrite, or another DEST")
    dest.mkdir(parents=True, exist_ok=True)
    for f, t in targets:
        shutil.copyfile(f.path, t)
    return [t for _, t in targets]


def listing() -> str:
    lines = []
    for kind in KINDS:
        files = [f for f in packaged_files() if f.kind == kind]
        lines.append(f"{kind}s ({folder(kind)}):")
        width = max((len(f.name) for f in files), default=0)
        lines += [f"  {f.name:<{width}}  {f.summary}".rstrip() for f in files]
        lines.append("")
    lines.append("copy one to edit it: baton recipes copy NAME [DEST]   (all of them: baton recipes copy all DEST)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="baton recipes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.add_parser("list", help="list the recipes and templates (the default)")
    cp = sub.add_parser("copy", help="copy a recipe (with its base: chain) or template, or all of them")
    cp.add_argument("name", help=f"a recipe or template name (with or without its suffix), or `{ALL}`")
    cp.add_argument("dest", nargs="?", default=".", help="directory to copy into (created; default .)")
    cp.add_argument("--force", action="store_true", help="overwrite files that are already there")
    args = parser.parse_args(argv)
    if args.action in (None, "list"):
        print(listing())
        return 0
    files = packaged_files() if args.name == ALL else with_bases(find(args.name))
    for target in copy(files, Path(args.dest), force=args.force):
        print(target)
    return 0
