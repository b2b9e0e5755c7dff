"""Every example in examples/ runs as it is and prints what it found."""

import runpy
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))

#: lines each example must print (its checks passed, and describe's table of 0.3)
PRINTS = {
    "freeze_embedding.py": ["old rows unchanged, new rows trained", "none for the 32000 frozen"],
    "gpt2_new_tokens.py": ["old rows unchanged: 1000 rows bitwise equal",
                           "new rows changed: 100/100", "loads into a plain GPT-2"],
    "seed_linear.py": ["AdamW: loss after 200 steps", "SGD: loss after 200 steps",
                       "per-element rule at every step, bit for bit",
                       "'per-element weight_decay': weight_decay=0.0", "  5-9 ",
                       "loads into a plain nn.Linear"],
    "sparse_finetune.py": ["optimizer state", "bitwise unchanged; trained elements moved: ok"],
    "qkv_fused_projection.py": ["transformer.h.1.attn.c_attn.weight  cols 64:96",
                                "q/k/v blocks train bitwise as three separate tensors: ok",
                                "loads into a plain GPT-2"],
    "rigl.py": ["2 drop-and-grow updates", "elements never trained bitwise unchanged: ok",
                "time in paramsplit.resplit:", "RigL  fixed mask"],
}

#: environment variables an example runs with here (shorter runs of the same code)
ENV = {"rigl.py": {"RIGL_STEPS": "120"}}  # 2 updates (steps 50 and 100) instead of 5


def test_examples_exist():
    assert set(PRINTS) <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path, capsys, monkeypatch):
    for key, value in ENV.get(path.name, {}).items():
        monkeypatch.setenv(key, value)
    runpy.run_path(str(path), run_name="__main__")
    out = capsys.readouterr().out
    assert out.strip()
    for line in PRINTS.get(path.name, []):
        assert line in out, (line, out)
    header = next(line for line in out.splitlines() if line.startswith("parameter"))
    assert header.split() == ["parameter", "region", "elements", "options", "layout"]
    assert "__" not in out  # no 0.2 part names (weight__0) anywhere


def test_readme_ten_line_example_runs(capsys, tmp_path, monkeypatch):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("## Ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)  # whatever it saves lands here, not in the repository
    exec(compile(block, "README.md", "exec"), {})
    assert "0.weight" in capsys.readouterr().out
