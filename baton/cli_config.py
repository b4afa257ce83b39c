"""The command line of a stage that takes a config: `baton STAGE CONFIG [key=value ...]`.

`--help` lists every config key with its default and the comment beside it in the dataclass, so
the keys are discoverable without reading the source, and the list cannot drift from the schema
(it is read from the schema). `--print-config` prints the resolved config (dataclass defaults <-
YAML <- overrides, what the run would write to `run_dir/config.yaml`) and exits 0 without doing
any work: the way to check a recipe and its overrides before spending a job on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import json
import shutil
import textwrap
import tokenize
from typing import Any, Sequence, TypeVar

from baton.config import load_config, to_yaml

T = TypeVar("T")


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the dataclass source: the comment at the end of the field's
    line, after the comment lines right above it. {} when the source is not available."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}        # line number -> comment text
    code_lines: set[int] = set()         # lines with code on them
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                comments[tok.start[0]] = tok.string.lstrip("#").strip()
            elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                                  tokenize.ENDMARKER):
                code_lines.add(tok.start[0])
    except (tokenize.TokenError, SyntaxError):
        return {}
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        head = line.strip().split(":", 1)[0].strip()
        if head not in names or not line.startswith("    ") or line.startswith("     "):
            continue
        above: list[str] = []
        n = number - 1
        while n in comments and n not in code_lines:
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(above + ([comments[number]] if number in comments and number in code_lines else []))
        if text:
            out.setdefault(head, text)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "???"


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value and value.strip() == value else repr(value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def _section_doc(cls: type) -> str:
    """The first line of a section dataclass's own docstring ("" for dataclass's generated one)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc.split("\n")[0]


def config_keys(schema: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, default as typed on the command line, comment, section doc) for every leaf.
    A schema with a `CHOSEN_SECTION` (baton.config) lists every choice's section after its own keys,
    each marked with the choice that reads it."""
    rows = []
    comments = field_comments(schema)
    for f in dataclasses.fields(schema):
        value = _default(f)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            rows.append((key, "", comments.get(f.name, "") or f.metadata.get("help", "") or
                         _section_doc(type(value)), "section"))
            rows.extend(config_keys(type(value), key + "."))
        else:
            bounds = " and ".join(f"{op} {f.metadata[k]}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="))
                                  if f.metadata.get(k) is not None)
            comment = " ".join(filter(None, [comments.get(f.name, ""), f"({bounds})" if bounds else ""]))
            rows.append((key, _show(value), comment, ""))
    chosen = getattr(schema, "CHOSEN_SECTION", None)
    if chosen is not None and getattr(schema, "CHOSEN_NAME", None) is None:  # not yet a concrete schema
        for name, section in chosen.sections().items():
            doc = " ".join(filter(None, [f"(used when {chosen.key}={name})", _section_doc(section)]))
            rows.append((prefix + name, "", doc, "section"))
            rows.extend(config_keys(section, f"{prefix}{name}."))
    return rows


def config_help(schema: type, width: int | None = None) -> str:
    """Every key of `schema` as `key=default  # comment`, sections as headers, wrapped to `width`."""
    width = width or max(80, min(140, shutil.get_terminal_size((120, 24)).columns))
    lines = ["config keys (key=default; set any of them as key=value after CONFIG):"]
    leaves = [r for r in config_keys(schema) if r[3] != "section"]
    column = min(44, max(len(k) + len(v) + 3 for k, v, _, _ in leaves))
    for key, shown, comment, kind in config_keys(schema):
        if kind == "section":
            lines += ["", f"{key}:" + (f"  {comment}" if comment else "")]
            continue
        entry = f"  {key}={shown}"
        if not comment:
            lines.append(entry)
            continue
        indent = " " * (column + 2)
        wrapped = textwrap.wrap(comment, width=max(30, width - len(indent) - 2))
        first = entry.ljust(column) + "  # " + wrapped[0] if len(entry) < column else entry
        lines.append(first)
        rest = wrapped[1:] if len(entry) < column else wrapped
        lines += [indent + "# " + w for w in rest]
    return "\n".join(lines)


def parse_stage_config(prog: str, schema: type[T], argv: Sequence[str], doc: str | None,
                       example: str) -> T | None:
    """The stage's config from `CONFIG [key=value ...]`, or None when `--print-config` printed it
    (the caller then returns 0). `--help` prints the first paragraph of `doc` (the stage module's
    docstring), the arguments and the keys, and exits 0 (argparse's SystemExit)."""
    description = " ".join((doc or "").split("\n\n")[0].split()).replace("`", "")
    parser = argparse.ArgumentParser(prog=prog, description=description, epilog=config_help(schema),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help=f"YAML recipe, e.g. {example}")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (the keys below), e.g. train.epochs=2")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (YAML <- overrides) and exit without running")
    args = parser.parse_intermixed_args(list(argv))  # --print-config anywhere among the overrides
    cfg = load_config(schema, args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return None
    return cfg
