"""Run the `c2mf` CLI in this process and SIGKILL it at a chosen point (the kill -9 tests start it as a subprocess).

    python -m tests.kill9 POINT N -- c2mf arguments...

POINT is where the N-th event kills the process, without any cleanup (as kill -9 or a power cut would):
  progress            the N-th advance of any progress bar (factorize: the end of a pass, before its checkpoint)
  replace:SUFFIX      the N-th os.replace onto a path ending in SUFFIX: the temporary file is written, not published
  call:MODULE:NAME    the N-th call of MODULE.NAME (e.g. c2mf_cli.artifacts.store:build_manifest)
  none                run to the end
"""

from __future__ import annotations

import importlib
import os
import signal
import sys


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    import torch

    torch.set_num_threads(1)  # as the tests' own process: the same threads give the same bits
    point, n, sep, *args = argv
    if sep != "--":
        raise SystemExit("usage: python -m tests.kill9 POINT N -- c2mf arguments...")
    count = [0]

    def nth() -> bool:
        count[0] += 1
        return count[0] == int(n)

    kind, _, where = point.partition(":")
    if kind == "progress":
        from c2mf_cli.commands import _console

        task = _console.Reporter.task

        def counted_task(self, *a, **kw):
            advance = task(self, *a, **kw)

            def counted(*x, **y):
                if nth():
                    _die()
                return advance(*x, **y)

            return counted

        _console.Reporter.task = counted_task
    elif kind == "replace":
        replace = os.replace

        def dying_replace(src, dst):
            if str(dst).endswith(where) and nth():
                _die()
            return replace(src, dst)

        os.replace = dying_replace
    elif kind == "call":
        module_name, _, name = where.partition(":")
        module = importlib.import_module(module_name)
        original = getattr(module, name)

        def dying_call(*a, **kw):
            if nth():
                _die()
            return original(*a, **kw)

        setattr(module, name, dying_call)
    elif kind != "none":
        raise SystemExit(f"unknown kill point {point!r}")
    from c2mf_cli.cli import app

    app(args, prog_name="c2mf")


if __name__ == "__main__":
    main(sys.argv[1:])
