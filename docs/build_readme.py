"""Assemble README.md from docs/sections/*.md (sorted by name) so each capability documents itself."""
from pathlib import Path

root = Path(__file__).resolve().parent.parent
parts = [p.read_text().rstrip() + "\n" for p in sorted((root / "docs" / "sections").glob("*.md"))]
(root / "README.md").write_text("\n".join(parts))
print(f"README.md: {len(parts)} sections")
