"""Every example in examples/ runs as it is."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def test_examples_exist():
    assert {"seed_linear.py", "freeze_embedding.py", "sparse_finetune.py"} <= \
        {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, capsys):
    runpy.run_path(str(path), run_name="__main__")
    assert capsys.readouterr().out.strip()


def test_readme_ten_line_example_runs(capsys):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(block, "README.md", "exec"), {})
    assert "0.weight" in capsys.readouterr().out
