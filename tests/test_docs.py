"""The README and docs/: length, links that resolve, and a config reference that matches the schemas."""
from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _builder():
    spec = importlib.util.spec_from_file_location("build_config_reference", ROOT / "docs" / "build_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_at_most_300_lines():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= 300, f"README.md has {n} lines; move detail into docs/ (the cap is 300)"


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors of a Markdown file: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", text, flags=re.M)}


@pytest.mark.parametrize("path", [ROOT / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_point_to_existing_files_and_headings(path):
    missing = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = path.parent / file if file else path
        if not dest.exists() or (anchor and dest.suffix == ".md" and anchor not in _anchors(dest)):
            missing.append(target)
    assert not missing, f"{path.relative_to(ROOT)} links to missing files or headings: {missing}"


def test_readme_command_map_lists_every_command():
    from speechssl.cli.main import COMMANDS

    readme = (ROOT / "README.md").read_text()
    missing = [c for c in COMMANDS if f"| `speechssl {c}" not in readme]
    assert not missing, f"README.md's command map lacks {missing}"


def test_benchmarks_page_names_every_bench_script():
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    scripts = sorted(p.name for p in (ROOT / "bench").iterdir() if p.suffix in (".py", ".sh"))
    missing = [name for name in scripts if f"`bench/{name}" not in text]
    assert scripts and not missing, f"docs/benchmarks.md lacks {missing}: give each its command and figures"


def test_no_doc_mentions_the_removed_internals_page():
    stale = [p.name for p in [ROOT / "README.md", *DOCS] if "internals.md" in p.read_text()]
    assert not stale, f"docs/internals.md was replaced by docs/architecture.md; still named in {stale}"


def test_config_reference_is_current():
    text = _builder().build()
    current = (ROOT / "docs" / "config.md").read_text()
    assert current == text, "docs/config.md is stale: run `python docs/build_config_reference.py`"


@dataclasses.dataclass
class _Toy:
    precision: typing.Literal["fp32", "bf16"] = "fp32"  # autocast dtype
    # several lines above a field
    # belong to it
    steps: int = 3
    path: typing.Optional[str] = None
    size: list[int] = dataclasses.field(default_factory=lambda: [1, 2])  # beside | with a bar,
                                                                         # continued below
    last: float = 0.5


def test_reference_rows_show_literal_choices_defaults_and_comments():
    rows, nested = _builder().section_rows(_Toy, _Toy())
    assert nested == []
    assert rows == [
        "| `precision` | fp32 \\| bf16 | `fp32` | autocast dtype |",
        "| `steps` | int | `3` | several lines above a field belong to it |",
        "| `path` | str \\| None | `null` |  |",
        "| `size` | list[int] | `[1, 2]` | beside \\| with a bar, continued below |",
        "| `last` | float | `0.5` |  |",
    ]


def test_architecture_example_objective_trains_through_the_contract():
    import torch

    from speechssl.models import build_encoder
    from speechssl.models.objectives import OBJECTIVES, build_objective
    from speechssl.train.contract import StepOutput, declared_capabilities

    text = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n(from torch import nn\n.*?)```", text, re.S).group(1)
    try:
        exec(code, {})
        torch.manual_seed(0)
        obj = build_objective("masked_l1", build_encoder("tiny_hubert"), mask_prob=0.5)
        out = obj({"audio": torch.randn(2, 16000), "audio_lens": torch.tensor([16000, 12000])})
        assert isinstance(out, StepOutput) and out.loss.ndim == 0 and torch.isfinite(out.loss)
        assert 0 < out.sample_size <= 49 + 37   # masked frames of the two utterances' valid frames
        out.loss.backward()
        assert declared_capabilities(type(obj)) == {"step", "shared_layerdrop"}
    finally:
        OBJECTIVES.pop("masked_l1", None)
