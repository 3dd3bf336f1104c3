"""Render every figure of docs/gallery.md into docs/figures/gallery/*.png.

    python docs/scripts/gallery.py

Runs the python blocks of docs/gallery.md in order, in one namespace, exactly as
tests/test_docs.py does; after each block, the current figure is written to the image the
gallery shows below that block (``![...](figures/gallery/NAME.png)``), with
``errprop.plots.save``. Seeded and small: well under a minute.
"""

import re
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import errprop.plots as epp  # noqa: E402

DOCS = Path(__file__).resolve().parents[1]
GALLERY = DOCS / "gallery.md"
PATTERN = re.compile(r"```python\n(?P<code>.*?)```|!\[[^\]]*\]\((?P<image>[^)]+\.png)\)",
                     flags=re.S)


def main() -> None:
    start = time.perf_counter()
    namespace: dict = {}
    pending = None  # the figure of the last block, until its image link names it
    for match in PATTERN.finditer(GALLERY.read_text(encoding="utf-8")):
        if match["code"] is not None:
            before = set(plt.get_fignums())
            exec(compile(match["code"], str(GALLERY), "exec"), namespace)  # noqa: S102
            new = [n for n in plt.get_fignums() if n not in before]
            pending = plt.figure(new[-1]) if new else None
        elif pending is not None:
            (path,) = epp.save(pending, DOCS / match["image"], dpi=200)
            print(f"wrote {path.relative_to(DOCS.parent)}", file=sys.stderr)
            pending = None
    plt.close("all")
    print(f"{time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
