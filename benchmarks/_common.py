"""What the benchmarks share: writing a result file, and loading overcomplete's modules.

Each benchmark is run as a script (`python benchmarks/NAME.py`), so this folder is on sys.path and
`from _common import ...` finds this module.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import socket
import sys
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def free_port() -> int:
    """A TCP port free on this host now, for a benchmark's own process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The environment torchrun would give process `rank` of `world` on this host (for distributed.start)."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def write_result(doc: Any, path: str | Path) -> Path:
    """Write a benchmark's JSON document (indented, newline at the end), making its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def overcomplete_module(name: str) -> types.ModuleType:
    """`overcomplete.<name>` without the package's __init__, which imports cv2, torchvision and an old matplotlib
    that the benchmarks do not need. Raises ModuleNotFoundError when overcomplete is not installed."""
    spec = importlib.util.find_spec("overcomplete")
    if spec is None:
        raise ModuleNotFoundError("overcomplete is not installed: pip install overcomplete (the `bench` extra)")
    if "overcomplete" not in sys.modules:
        pkg = types.ModuleType("overcomplete")
        pkg.__path__ = list(spec.submodule_search_locations or [])
        pkg.__spec__ = spec  # import_module needs the parent's spec; its __init__ is never run
        sys.modules["overcomplete"] = pkg
    return importlib.import_module(f"overcomplete.{name}")
