"""README.md stays true: its ten-line example runs and prints what it says."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _block(heading: str) -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_ten_line_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = _block("## In ten lines")
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    claimed = re.search(r"# (trainable params: [\d,]+)", code).group(1)
    assert claimed in printed
    assert (tmp_path / "adapter.pt").is_file()
    x = namespace["x"]
    import torch

    assert torch.allclose(namespace["fresh"](x), namespace["model"](x))
    assert torch.allclose(namespace["merged"](x), namespace["model"](x), atol=1e-5)
    assert not any("parametrizations" in k for k in namespace["merged"].state_dict())


def test_readme_stays_short() -> None:
    """Everything beyond the essentials lives in docs/ (issue 19: at most 250 lines)."""
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250


def test_readme_links_reach_existing_pages() -> None:
    """The README's feature list links each feature's page: one click from the README."""
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert len(local) >= 15
    missing = [link for link in local if not (README.parent / link).exists()]
    assert not missing, missing
