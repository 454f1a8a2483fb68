"""The README's Python blocks run as written; its Errors table lists every graphquant error class."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import graphquant.errors as errors_module

README = Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_python_blocks():
    assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index, capsys, tmp_path, monkeypatch):
    import warnings

    monkeypatch.chdir(tmp_path)  # blocks may save checkpoints

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(_python_blocks()[index], f"README.md python block {index}", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # each block prints what it shows


def test_errors_section_lists_every_error_class():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Errors"):]
    section = section[:section.index("\n## ", 5)] if "\n## " in section[5:] else section
    classes = [n for n, c in vars(errors_module).items()
               if isinstance(c, type) and issubclass(c, errors_module.GraphQuantError) and n != "GraphQuantError"]
    assert classes and all(f"`{n}`" in section for n in classes), classes
