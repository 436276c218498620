"""`c2mf factorize` and `c2mf methods` through the CLI, on the small stores of conftest."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer.main
import zarr
from typer.testing import CliRunner

from c2mf_cli.cli import app
from c2mf_cli.stages.describe import describe_dictionary
from c2mf_cli.artifacts.dictionary import ConceptDictionary
from c2mf_cli.errors import C2MFError
from c2mf_cli.methods import list_methods
from c2mf_cli.artifacts.store import ActivationStore, StoreWriter

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result) -> str:
    text = result.output  # click mixes stderr into output
    lines = [line for line in text.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, text
    return lines[0]


def test_methods_lists_the_registry():
    r = _run("methods", "--json")
    assert r.exit_code == 0, r.output
    names = [row["name"] for row in json.loads(r.stdout)]
    assert names == list_methods() and {"c2mf", "craft", "pca", "nmf", "semi-nmf"} <= set(names)
    r = _run("methods")
    assert r.exit_code == 0 and "semi-nmf" in r.stdout


def test_help_has_an_example():
    r = _run("factorize", "--help")
    assert r.exit_code == 0 and "Example: c2mf factorize" in r.stdout
    assert "`c2mf methods`" in r.stdout  # the list is read from the registry only when a command runs


def test_unknown_method_lists_the_registry(tiny_store: Path, tmp_path: Path):
    r = _run("factorize", "-s", tiny_store, "--method", "nfm", "-k", 3, "-o", tmp_path / "d.safetensors")
    assert r.exit_code == 2
    assert _error_line(r) == ("Error: unknown --method 'nfm': did you mean 'nmf'? use one of "
                              f"{', '.join(list_methods())} (see `c2mf methods`)")


def test_c2mf_end_to_end(tiny_store: Path, tmp_path: Path):
    out = tmp_path / "c2mf.safetensors"
    r = _run("factorize", "-s", tiny_store, "--method", "c2mf", "--concepts", 4, "--iterations", 6, "--batch-size", 40,
             "--checkpoint-every", 2, "--device", "cpu", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["method"] == "c2mf" and summary["concepts"] == 4 and summary["gated"]
    assert summary["config"]["alpha"] == "auto" and summary["alpha"] > 0  # the value the auto rule resolved
    assert len(summary["per_class_concepts"]) == 3 and summary["layer"]
    assert not out.with_name(out.name + ".ckpt").exists()  # removed once the dictionary is written
    d = ConceptDictionary.load(out)
    store = ActivationStore.open(tiny_store)
    assert d.classes == store.classes
    assert d.meta["source"]["info"]["fingerprint"] == store.fingerprint
    d.check_compatible(store.describe_source())
    other = dict(store.describe_source(), layer="layer1")
    with pytest.raises(C2MFError, match="fitted on layer .* the store has 'layer1'"):
        d.check_compatible(other)
    info = describe_dictionary(out)
    assert info["classes"] == 3 and all("concepts_used" in row for row in info["per_class_concepts"])
    r = _run("info", out, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["method"] == "c2mf"
    r = _run("factorize", "-s", tiny_store, "--method", "c2mf", "--concepts", 4, "--iterations", 3, "--alpha", "0.05",
             "--device", "cpu", "--json", "--out", tmp_path / "fixed.safetensors")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["alpha"] == 0.05


@pytest.mark.parametrize("args", [["--method", "pca", "--shared"], ["--method", "semi-nmf", "--full-batch"],
                                  ["--method", "nmf", "--shift", "--iterations", "3"]])
def test_other_methods_on_full_store(tiny_store: Path, tmp_path: Path, args):
    out = tmp_path / "d.safetensors"
    r = _run("factorize", "-s", tiny_store, *args, "--concepts", 3, "--device", "cpu", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    assert ConceptDictionary.load(out).n_concepts == 3


def test_craft_on_crop_store(tiny_crop_store: Path, tmp_path: Path):
    out = tmp_path / "craft.safetensors"
    r = _run("factorize", "-s", tiny_crop_store, "--method", "craft", "--concepts", 3, "--iterations", 5, "--shift",
             "--tol", 0, "--device", "cpu", "--quiet", "--out", out)
    assert r.exit_code == 0, r.output
    d = ConceptDictionary.load(out)
    assert d.per_class and d.meta["source"]["mode"] == "crops"
    # one fit per class: --iterations bounds each, and the count says so (it once summed the classes' passes)
    n = len(d.classes)
    assert n > 1 and all(h["passes"] == 5 for h in d.meta["history"])
    assert f"up to 5 passes per class ({5 * n} in all)" in r.output
    info = _run("info", out, "--json")
    summary = json.loads(info.output)
    assert (summary["passes"], summary["passes_total"], summary["fits"]) == (5, 5 * n, n)


@pytest.mark.parametrize(
    "store_fixture,args,code,message",
    [
        ("tiny_crop_store", ["--method", "c2mf"], 1, "learns from whole-image activations, but this store holds crops"),
        ("tiny_store", ["--method", "craft"], 1, "learns from crop activations (the CRAFT reference)"),
        ("tiny_store", ["--method", "c2mf", "--concepts", "500"], 2, "--concepts 500 is larger than the 192 channels"),
        ("tiny_store", ["--method", "pca", "--alpha", "0.1"], 2, "--alpha does not apply to --method pca"),
        ("tiny_store", ["--method", "craft", "--shared"], 2, "--shared/--per-class does not apply to --method craft"),
        ("tiny_store", ["--method", "c2mf", "--beta", "0"], 2, "--beta must be > 0"),
        ("tiny_store", ["--method", "c2mf", "--alpha", "lots"], 2, "--alpha must be 'auto' or a number >= 0, got 'lots'"),
        ("tiny_store", ["--method", "pca", "--alpha-scale", "1"], 2, "--alpha-scale does not apply to --method pca"),
        ("tiny_store", ["--method", "c2mf", "--resume"], 1, "--resume given but there is no checkpoint"),
        ("tiny_store", ["--method", "c2mf", "--device", "tpu"], 1, "unknown device 'tpu'"),
    ],
)
def test_bad_inputs_by_message_and_exit_code(request, tmp_path: Path, store_fixture, args, code, message):
    store = request.getfixturevalue(store_fixture)
    if "--concepts" not in args:
        args = args + ["--concepts", "3"]
    r = _run("factorize", "-s", store, *args, "--iterations", "2", "--quiet", "--out", tmp_path / "d.safetensors")
    assert r.exit_code == code, r.output
    assert message in _error_line(r)
    assert not (tmp_path / "d.safetensors").exists()


def test_missing_store_and_unknown_method(tmp_path: Path):
    r = _run("factorize", "-s", tmp_path / "nope.zarr", "--method", "c2mf", "--concepts", 3, "--out", tmp_path / "d")
    assert r.exit_code == 1 and "does not exist" in _error_line(r)
    r = _run("factorize", "-s", tmp_path, "--method", "ica", "--concepts", 3, "--out", tmp_path / "d")
    assert r.exit_code == 2 and "ica" in r.output


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nan_in_store_is_an_error(tiny_store: Path, tmp_path: Path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(tiny_store, bad)
    root = zarr.open_group(str(bad), mode="r+", zarr_format=3)
    name = [k for k in root.group_keys()][-1]
    arr = root[name]["activations"]
    block = np.asarray(arr[:1])
    block[...] = np.nan
    arr[:1] = block
    StoreWriter(bad).finalize()  # sealed again: a store made so (its NaN is the model's), not one damaged since
    r = _run("factorize", "-s", bad, "--method", "c2mf", "--concepts", 3, "--iterations", 2, "--quiet",
             "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 1, r.output
    assert "NaN or infinite activations" in _error_line(r)


def test_sae_options_through_the_cli(tiny_store: Path, tmp_path: Path):
    """The SAE's own options (declared only in its config) reach its fit from the command line."""
    out = tmp_path / "sae.safetensors"
    r = _run("factorize", "-s", tiny_store, "--method", "sae", "-k", 8, "--top-k", 2, "--lr", "0.01",
             "--resample-after", 3, "--iterations", 2, "-b", 16, "--seed", 1, "--device", "cpu", "--json", "--out", out)
    assert r.exit_code == 0, r.output
    config = json.loads(r.stdout)["config"]
    assert (config["top_k"], config["lr"], config["resample_after"]) == (2, 0.01, 3)
    assert (config["iterations"], config["batch_size"], config["seed"]) == (2, 16, 1)
    assert ConceptDictionary.load(out).meta["top_k"] == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "c2mf", "--top-k", "2"], "Error: --top-k does not apply to --method c2mf (it takes --alpha, "),
        (["--method", "pca", "--lr", "0.1"], "; --lr is an option of sae"),
        (["--method", "sae", "--shift"], "; --shift/--no-shift is an option of craft, nmf"),
        (["--method", "sae", "--lr", "fast"], "Error: --lr must be float, got 'fast'"),
        (["--method", "sae", "--top-k", "9"], "Error: --top-k must be between 1 and --concepts (3), got 9"),
        (["--method", "sae", "--top-k", "2.5"], "Error: --top-k must be int, got '2.5'"),
    ],
)
def test_method_options_are_checked_by_name(tiny_store: Path, tmp_path: Path, args, message):
    r = _run("factorize", "-s", tiny_store, *args, "-k", 3, "--quiet", "--out", tmp_path / "d.safetensors")
    assert r.exit_code == 2, r.output
    assert message in _error_line(r)
    assert not (tmp_path / "d.safetensors").exists()


def test_help_lists_every_method_option_with_the_methods_that_take_it():
    from c2mf_cli.methods import method_options

    params = {p.name: p for p in typer.main.get_command(app).commands["factorize"].params}  # type: ignore[attr-defined]
    for opt in method_options():
        p = params[opt.name]
        flags = "/".join(p.opts) + ("/" + "/".join(p.secondary_opts) if p.secondary_opts else "")
        assert set(opt.flag.split("/")) <= set(flags.split("/")), (opt.flag, flags)
        if len(opt.defaults) < len(list_methods()):
            assert p.help.startswith(", ".join(opt.defaults) + ": "), p.help
        assert p.show_default == opt.default_text()
    text = " ".join(_run("factorize", "--help").stdout.split())
    assert "--top-k N sae: Latents active per row. [default: (min(32, k / 4))]" in text
    assert "-b, --batch-size N Rows per streamed batch" in text  # the shared table's short flag


def test_factorize_help_does_not_import_torch():
    code = ("import sys; from c2mf_cli.cli import app\n"
            "try:\n    app(['factorize', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, file=sys.stderr)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "--top-k" in r.stdout and r.stderr.strip() == "False"


def test_a_stale_options_manifest_gives_way_to_the_registry(tmp_path: Path, monkeypatch):
    """The manifest is used while it names the folder's modules; once they differ, the live registry answers."""
    from c2mf_cli.commands import factorize as command
    from c2mf_cli.methods.base import options_manifest

    (tmp_path / "mine.py").write_text("")
    fake = [{"name": "planted"}]
    (tmp_path / "options.json").write_text(json.dumps({"modules": ["mine"], "options": fake}))
    monkeypatch.setattr(command, "_METHODS_DIR", tmp_path)
    assert command.method_option_specs() == fake
    (tmp_path / "theirs.py").write_text("")
    assert command.method_option_specs() == options_manifest()["options"]
