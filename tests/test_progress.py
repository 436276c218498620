"""Progress in a log (stderr not a terminal): plain lines at the start, every interval, and at the end."""

from __future__ import annotations

import pytest

from c2mf_cli.commands._console import Reporter
from c2mf_cli.errors import UsageError


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _reporter(lines: list[str], clock: FakeClock, interval: float = 30.0) -> Reporter:
    return Reporter(interactive=False, interval=interval, write=lines.append, clock=clock)


def test_plain_lines_every_interval_and_at_the_end():
    lines: list[str] = []
    clock = FakeClock()
    rep = _reporter(lines, clock)
    with rep.session():
        advance = rep.task("extract layer3", 400)
        for _ in range(10):  # 10 chunks of 40 images, 12 s each: lines at 36 s, 72 s (and not between)
            clock.t += 12
            advance(40)
    assert lines == [
        "[extract layer3] started, 400 to do",
        "[extract layer3] 120/400 (30%), 3.33/s, elapsed 0:00:36, ETA 0:01:24",
        "[extract layer3] 240/400 (60%), 3.33/s, elapsed 0:01:12, ETA 0:00:48",
        "[extract layer3] 360/400 (90%), 3.33/s, elapsed 0:01:48, ETA 0:00:12",
        "[extract layer3] 400/400 (100%), 3.33/s, elapsed 0:02:00, done",
    ]


def test_a_corrected_total_and_a_note_are_shown():
    """A fit that converges at pass 3 of at most 100: the total is corrected, so it ends at 100% without a leap,
    and the convergence measure is on the line."""
    lines: list[str] = []
    clock = FakeClock()
    rep = _reporter(lines, clock, interval=10)
    with rep.session():
        advance = rep.task("c2mf", 100)
        for change in (0.1, 0.01):
            clock.t += 10
            advance(1, note=f"rel. change {change:g} (tol 0.001)")
        clock.t += 10
        advance(1, total=3, note="rel. change 0.0005 (tol 0.001): converged")
    assert lines[1] == "[c2mf] 1/100 (1%), 0.1/s, elapsed 0:00:10, ETA 0:16:30; rel. change 0.1 (tol 0.001)"
    assert lines[-1] == ("[c2mf] 3/3 (100%), 0.1/s, elapsed 0:00:30, done; rel. change 0.0005 (tol 0.001): "
                         "converged")
    assert len(lines) == 4


def test_an_unfinished_task_is_closed_by_the_session_and_quiet_writes_nothing():
    lines: list[str] = []
    clock = FakeClock()
    rep = _reporter(lines, clock)
    with pytest.raises(KeyboardInterrupt):
        with rep.session():
            advance = rep.task("evaluate", None)
            clock.t += 5
            advance(7)
            raise KeyboardInterrupt
    assert lines == ["[evaluate] started", "[evaluate] 7, 1.4/s, elapsed 0:00:05, stopped"]
    quiet: list[str] = []
    rep = Reporter(quiet=True, interactive=False, write=quiet.append, clock=clock)
    with rep.session():
        rep.task("x", 3)(3)
    assert quiet == []


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("C2MF_PROGRESS_INTERVAL", "5")
    assert Reporter(interactive=False).interval == 5.0
    monkeypatch.setenv("C2MF_PROGRESS_INTERVAL", "soon")
    with pytest.raises(UsageError, match="C2MF_PROGRESS_INTERVAL must be a number of seconds, got 'soon'"):
        Reporter(interactive=False)


def test_factorize_in_a_log_writes_passes_with_the_convergence_measure(tiny_store, tmp_path, monkeypatch,
                                                                       one_thread):
    """Through the CLI with stderr captured (not a terminal): one line per pass here (interval ~0), each with the
    relative error and the objective's change; the last says done and counts the passes made, not --iterations."""
    import re

    from typer.testing import CliRunner

    from c2mf_cli.cli import app

    monkeypatch.setenv("C2MF_PROGRESS_INTERVAL", "1e-9")
    r = CliRunner().invoke(app, ["factorize", "-s", str(tiny_store), "--method", "c2mf", "-k", "3", "--iterations",
                                 "200", "--tol", "1e-3", "--device", "cpu", "-o", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 0, r.output
    lines = [x for x in r.stderr.splitlines() if x.startswith("[c2mf]")]
    assert lines[0] == "[c2mf] started, 200 to do"
    passes = [x for x in lines if re.search(r"pass \d+, rel\. error 0\.\d{4}", x)]
    assert len(passes) >= 2 and "objective change" in passes[1] and "(stops below 1e-03)" in passes[1]
    last = lines[-1]
    made = int(re.search(r"pass (\d+)", last).group(1))
    assert made < 200, "the fixture converges well before 200 passes"
    assert last.startswith(f"[c2mf] {made}/{made} (100%), ") and ", done; " in last and last.endswith(": converged")
