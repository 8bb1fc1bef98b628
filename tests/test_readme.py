"""The README's Python examples run as written: every ```python block, in order, in one namespace."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3  # the API section's examples: the test must not pass by finding none
    monkeypatch.chdir(tmp_path)  # they write api-student/ into the current folder
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    assert (tmp_path / "api-student" / "model.safetensors").is_file()
    x = namespace["data"].test.x[:8]
    import distill

    assert distill.load(tmp_path / "api-student")(x).shape == (8, 10)
