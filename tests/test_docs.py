"""The documentation stays true: the README starts with the two commands and links only pages
that exist, and the API page's code runs as written on the bundled models."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_starts_with_the_two_commands_and_its_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    first = readme.splitlines()[:6]
    assert first[0] == "# onnxprune" and first[2] == "```"
    assert first[3].startswith("make demo ") and first[4].startswith("make test ")
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for link in re.findall(r"\]\(([^)#]+\.(?:md|png))(?:#[^)]*)?\)", page.read_text()):
            if "://" not in link:
                assert (page.parent / link).exists(), f"{page.name} links {link}"


def test_the_api_page_runs(tmp_path, monkeypatch) -> None:
    text = (ROOT / "docs" / "api.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    os.symlink(ROOT / "models", tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), scope)
    assert (tmp_path / "digits.small.onnx").is_file()
    assert scope["report"].validation.reference.perplexity is not None  # type: ignore[attr-defined]
