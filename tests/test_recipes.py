"""Every shell recipe parses and answers --help (the option parser sees each script's own defaults)."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(p for p in [*ROOT.glob("recipes/*/*.sh"), *ROOT.glob("egs/**/run.sh")] if not p.name.startswith("_"))


def test_recipes_exist():
    names = {str(p.relative_to(ROOT)) for p in SCRIPTS}
    for required in ("egs/mini/run.sh", "recipes/ssl/hubert.sh", "recipes/compress/dphubert.sh", "recipes/superb/run.sh"):
        assert required in names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses_and_helps(script):
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    out = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "--stage" in out.stderr


def test_unknown_option_is_an_error():
    out = subprocess.run(["bash", str(ROOT / "egs/mini/run.sh"), "--no-such-option", "1"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "unknown option --no-such-option" in out.stderr
