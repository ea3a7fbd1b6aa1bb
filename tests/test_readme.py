"""The README's usage examples run as written: every ```python block, in order, in one namespace."""
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 4, "the README lost its usage examples"
    namespace = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)


def test_the_repository_stands_alone():
    """No tracked file links outside the repository: not to the contract it grew from (docs/contract.md
    is the contract), nor to the web (peers are named, not linked)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./shared|SPEC\.md|\bSPEC (section|\d)|https?://")
    found = [f"{name}:{i + 1}" for name in files if name.endswith((".py", ".md", ".yaml", ".toml"))
             for i, line in enumerate((root / name).read_text(errors="replace").splitlines())
             if outside.search(line) and name != "tests/test_readme.py"]
    assert found == []
    assert (root / "docs" / "contract.md").is_file()
