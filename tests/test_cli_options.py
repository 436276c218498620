"""The one table of options: every command spells a shared option the same way, the README shows the table,
old spellings still work with a note, and the CLI starts without importing torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from c2mf_cli.cli import app
from c2mf_cli.commands.options import DEPRECATED, SPECS, options_markdown, spec_key

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _commands():
    return typer.main.get_command(app).commands  # type: ignore[attr-defined]


def _visible_options(cmd):
    return [p for p in cmd.params if p.param_type_name == "option" and not p.hidden and p.name != "help"]


def test_every_shared_flag_comes_from_the_table():
    """A flag that the table defines is declared through it everywhere: same long and short flags, same
    metavar. A command's own option may not take a flag the table reserves."""
    reserved = {f: key for key, spec in SPECS.items() for flag in spec.flags for f in flag.split("/")}
    seen = set()
    for name, cmd in _commands().items():
        for p in _visible_options(cmd):
            key = spec_key(p)
            flags = set(p.opts) | set(p.secondary_opts)
            if key is None:
                clash = sorted(f for f in flags if f in reserved)
                assert not clash, f"`c2mf {name}` declares {clash} outside the options table"
                continue
            seen.add(key)
            assert p.metavar == SPECS[key].metavar, f"`c2mf {name}` {p.opts}: metavar {p.metavar!r}"
    assert seen == set(SPECS), f"table entries no command uses: {set(SPECS) - seen}"


def test_no_two_commands_disagree_on_a_flag():
    meaning: dict[str, tuple[str, tuple[str, ...], str | None]] = {}
    for name, cmd in _commands().items():
        for p in _visible_options(cmd):
            flags = tuple(sorted(set(p.opts) | set(p.secondary_opts)))
            for f in flags:
                if f in meaning:
                    first, first_flags, first_metavar = meaning[f]
                    assert (first_flags, first_metavar) == (flags, p.metavar), (
                        f"{f}: `c2mf {first}` has {first_flags} {first_metavar}, `c2mf {name}` {flags} {p.metavar}")
                else:
                    meaning[f] = (name, flags, p.metavar)
    assert meaning["-m"][1] == ("--model", "-m") and meaning["-o"][1] == ("--out", "-o")


@pytest.mark.parametrize("command", ["extract", "factorize", "evaluate", "explain", "atlas", "report", "demo"])
def test_every_command_that_writes_takes_dash_o(command):
    assert any("-o" in p.opts for p in _commands()[command].params)


def test_help_shows_readable_metavars_and_defaults():
    for name, cmd in _commands().items():
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0, r.output
        assert "<list" not in r.output and "0.2857142857" not in r.output, name
    r = runner.invoke(app, ["extract", "--help"])
    assert "64/224 = 0.286" in r.output and "IMAGE..." in runner.invoke(app, ["explain", "--help"]).output


def test_the_readme_shows_the_table():
    readme = (ROOT / "README.md").read_text()
    table = options_markdown(app)
    assert table in readme, "README's options table is stale; paste c2mf_cli.commands.options.options_markdown(app)"
    for old in DEPRECATED:
        assert f"`{old}`" in table


def test_version_and_completion_options():
    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == runner.invoke(app, ["version"]).stdout.strip()
    r = runner.invoke(app, ["--help"])
    assert "--install-completion" in r.stdout and "--version" in r.stdout


def _error_and_notes(r) -> tuple[list[str], list[str]]:
    lines = r.output.splitlines()
    return [x for x in lines if x.startswith("Error:")], [x for x in lines if x.startswith("Deprecated:")]


def test_old_spellings_work_with_a_note(tiny_store: Path, tmp_path: Path, one_thread):
    old = runner.invoke(app, ["factorize", str(tiny_store), "-m", "pca", "-k", "2", "-o", str(tmp_path / "a.st"),
                              "--json"])
    assert old.exit_code == 0, old.output
    _, notes = _error_and_notes(old)
    assert notes == [
        "Deprecated: the positional STORE is now --store/-s (the positional STORE stops working in c2mf 0.3)",
        "Deprecated: -m is now --method (-m stops working in c2mf 0.3)",
    ]
    new = runner.invoke(app, ["factorize", "-s", str(tiny_store), "--method", "pca", "-k", "2",
                              "-o", str(tmp_path / "b.st"), "--json"])
    assert new.exit_code == 0 and not _error_and_notes(new)[1]
    assert json.loads(old.stdout)["relative_error"] == json.loads(new.stdout)["relative_error"]


def test_old_and_new_spelling_together_must_agree(tiny_store: Path, tmp_path: Path):
    r = runner.invoke(app, ["factorize", str(tiny_store), "-s", str(tmp_path), "--method", "pca", "-k", "2",
                            "-o", str(tmp_path / "a.st")])
    errors, _ = _error_and_notes(r)
    assert r.exit_code == 2 and errors == ["Error: give --store/-s only (the positional STORE is its old spelling)"]
    r = runner.invoke(app, ["factorize", "-k", "2", "--method", "pca", "-o", str(tmp_path / "a.st")])
    assert r.exit_code == 2 and _error_and_notes(r)[0] == ["Error: missing option --store/-s"]


def test_max_per_class_old_spelling_is_checked_under_its_new_name(tmp_path: Path):
    r = runner.invoke(app, ["extract", "-m", "test_resnet", "-l", "x", "-d", str(tmp_path), "-o",
                            str(tmp_path / "s.zarr"), "--max-per-class", "0"])
    errors, notes = _error_and_notes(r)
    assert r.exit_code == 2 and errors == ["Error: --max-images-per-class must be at least 1, got 0"]
    assert notes == ["Deprecated: --max-per-class is now --max-images-per-class (--max-per-class stops working in "
                     "c2mf 0.3)"]


def test_a_wrong_path_fails_before_the_model_loads(tmp_path: Path):
    """The model name is nonsense too: had it been loaded first, the error would name the model."""
    r = runner.invoke(app, ["extract", "-m", "no_such_model", "-l", "x", "-d", str(tmp_path / "missing"),
                            "-o", str(tmp_path / "s.zarr")])
    assert r.exit_code == 1
    assert _error_and_notes(r)[0] == [f"Error: --data {str(tmp_path / 'missing')!r} does not exist"]


def test_importing_the_cli_does_not_import_torch():
    code = ("import sys, c2mf_cli.cli; heavy = [m for m in ('torch', 'timm', 'matplotlib', 'zarr') "
            "if m in sys.modules]; print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert r.stdout.strip() == ""


def test_defaults_shown_without_importing_the_library_match_it():
    """Some defaults live in modules that import torch; help shows them as text, so check the text."""
    from c2mf_cli.distributed import DEFAULT_TIMEOUT_S

    for command in ("factorize", "evaluate"):
        timeout = next(p for p in _commands()[command].params if p.name == "timeout")
        assert float(timeout.show_default) == DEFAULT_TIMEOUT_S, command


def test_the_method_options_manifest_matches_the_registry():
    """`c2mf factorize --help` reads the methods' options from methods/options.json (no torch): it must say what
    the registry says."""
    from c2mf_cli.methods.base import OPTIONS_MANIFEST, options_manifest

    assert json.loads(OPTIONS_MANIFEST.read_text()) == options_manifest(), (
        "methods/options.json is stale: run python -c 'from c2mf_cli.methods.base import write_options_manifest; "
        "write_options_manifest()'")
