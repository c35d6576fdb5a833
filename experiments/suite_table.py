"""Markdown table of an instrument-suite JSON, for the model card and docs/experiments.md.

python experiments/suite_table.py docs/results/instruments-before.json
"""

from __future__ import annotations

import json
import sys

from napari_lcm_stain.evaluate import format_suite_markdown


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        print(format_suite_markdown(json.load(f)))


if __name__ == "__main__":
    main()
