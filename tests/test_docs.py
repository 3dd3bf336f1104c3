"""The code in README.md and docs/ runs as written."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


#: docs whose examples need optional packages -> the fixture that provides (or skips) them
NEEDS = {"docs/real-models.md": "minilm"}


@pytest.mark.parametrize("doc", ["README.md", "docs/adding-an-op.md", "docs/montecarlo.md",
                                 "docs/real-models.md", "docs/budgets.md", "docs/sweeps.md",
                                 "docs/formats.md", "docs/gallery.md", "docs/gpfq.md",
                                 "docs/training.md", "docs/symbolic.md", "docs/guide.md",
                                 "docs/graphs.md"])
def test_python_blocks_run(doc, request):
    if doc in NEEDS:
        request.getfixturevalue(NEEDS[doc])
    blocks = _python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no python code block"
    namespace: dict = {}
    exec(compile("\n".join(blocks), doc, "exec"), namespace)  # noqa: S102
