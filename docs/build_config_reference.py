"""Write docs/config.md, the config reference, from the dataclass schemas of the commands.

    python docs/build_config_reference.py            # regenerate docs/config.md
    python docs/build_config_reference.py --check    # exit 1 when docs/config.md is not what the schemas give

Each command's top-level config class is walked field by field; every nested dataclass becomes its own table
(key, type with Literal choices spelled out, default, and the comment written beside the field in the source:
the trailing ``# ...`` of its lines and any comment lines directly above it). A section whose table equals one
already written (same class, same defaults) points back to it instead of repeating it.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import io
import json
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "config.md"

# (title, module, class, how the config is given); imported lazily so that this file loads without torch.
SCHEMAS = [
    ("speechssl pretrain", "speechssl.train.pretrain", "PretrainConfig", "`conf/pretrain/*.yaml`"),
    ("speechssl distill", "speechssl.compress.distill", "DistillConfig", "`conf/distill/*.yaml`"),
    ("speechssl prune", "speechssl.compress.prune", "PruneConfig", "`conf/prune/*.yaml`"),
    ("speechssl superb", "speechssl.superb.train", "SuperbConfig", "`conf/superb/*.yaml`"),
    ("encoder", "speechssl.models.encoder", "EncoderConfig",
     "`conf/model/*.yaml`, `model.overrides` of a pretraining config, `config.json` of a model directory"),
]

HEADER = """# Config reference

Generated from the dataclass schemas by `python docs/build_config_reference.py`; do not edit by hand
(`tests/test_docs.py` fails when this file is stale). Every command reads a YAML file into its schema
(`--config FILE`), then applies `--set key.sub=value` overrides. An unknown key or a wrong type is an error that
names the key and suggests the closest valid one.
"""


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the class source, joined in source order: comment lines directly above the field
    at its own indentation, the trailing comments of its lines, and comment-only lines right below it that are
    indented further (a trailing comment continued on the next line)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[int, str, bool]] = {}  # line -> (column, text, whether the line holds only it)
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            alone = not lines[tok.start[0] - 1][:tok.start[1]].strip()
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip(), alone)
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n in comments and comments[n][2] and comments[n][0] == node.col_offset:
            above.insert(0, comments[n][1])
            n -= 1
        beside = [comments[i][1] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
        n = node.end_lineno + 1
        while beside and n in comments and comments[n][2] and comments[n][0] > node.col_offset:
            beside.append(comments[n][1])
            n += 1
        out[node.target.id] = " ".join(above + beside)
    return out


def type_name(tp) -> str:
    """A readable type: Literal choices joined by '|', Optional as '| None', generics with their arguments."""
    if tp is type(None):
        return "None"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(type_name(a) for a in args)}]" if args else name
    if tp is typing.Any:
        return "any"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def default_text(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def cell(text: str) -> str:
    """Text for a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def section_rows(cls, instance) -> tuple[list[str], list[tuple[str, object]]]:
    """Table rows of one dataclass and its nested dataclass fields as ``(name, value)``."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows, nested = [], []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, value))
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            value = dataclasses.MISSING
        rows.append(f"| `{f.name}` | {type_name(hints[f.name])} | {cell(default_text(value))} | "
                    f"{cell(comments.get(f.name, ''))} |")
    return rows, nested


def render_section(command: str, prefix: str, instance, seen: dict[str, str], out: list[str]) -> None:
    """Append the table of ``instance`` (a config section called ``prefix``) and then its nested sections."""
    cls = type(instance)
    rows, nested = section_rows(cls, instance)
    title = f"`{prefix}`" if prefix else "top level"
    if rows:
        table = "\n".join(["| key | type | default | meaning |", "|---|---|---|---|", *rows])
        key = f"{cls.__module__}.{cls.__qualname__}\n{table}"
        if key in seen:
            out.append(f"### {title} ({cls.__name__})\n\nAs {seen[key]}.\n")
        else:
            seen[key] = f"{title} of {command} above"
            out.append(f"### {title} ({cls.__name__})\n\n{table}\n")
    for name, value in nested:
        render_section(command, f"{prefix}.{name}" if prefix else name, value, seen, out)


def build() -> str:
    out = [HEADER]
    seen: dict[str, str] = {}
    for title, module, name, source in SCHEMAS:
        cls = getattr(importlib.import_module(module), name)
        out.append(f"## {title}\n\nSchema `{module}.{name}`, read from {source}.\n")
        render_section(f"`{title}`", "", cls(), seen, out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/config.md is stale; write nothing")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT.relative_to(ROOT)} is stale: run `python docs/build_config_reference.py`", file=sys.stderr)
            return 1
        print(f"{OUT.relative_to(ROOT)} is up to date")
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
