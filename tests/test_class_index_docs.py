"""The three `--class-index` shapes documented in docs/extract.md are the ones the loader reads."""

from __future__ import annotations

import re
from pathlib import Path

from c2mf_cli.inputs.data import class_labels, load_class_index

DOC = Path(__file__).resolve().parents[1] / "docs" / "extract.md"


def test_each_documented_shape_loads(tmp_path: Path):
    text = DOC.read_text()
    section = text[text.index("## Class folders and model outputs"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```json\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    expected = [
        ({"cat": 3, "dog": 5, "airplane": 0}, {}),
        ({"American_Goldfinch": 730}, {"American_Goldfinch": "Spinus tristis (American Goldfinch)"}),
        ({"n01440764": 0, "n01443537": 1}, {"n01440764": "tench", "n01443537": "goldfish"}),
    ]
    for i, (block, (index, labels)) in enumerate(zip(blocks, expected)):
        f = tmp_path / f"index{i}.json"
        f.write_text(block)
        assert load_class_index(f) == index
        assert class_labels(f) == labels
