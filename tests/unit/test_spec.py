"""Training configs: the examples load; bad ones name the field and the rule."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from scheduler.cli.main import app
from tests.conftest import REPO
from workers.interface.errors import ConfigError
from workers.interface.spec import load_spec, stored_spec

MINIMAL = "name: t\nmodel: {name: mlp}\ntrain: {max_steps: 3}\n"


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "train").glob("*.yaml")))
def test_example_configs_are_valid(path: Path) -> None:
    spec = load_spec(path.read_text())
    assert spec.name
    assert spec.train_params().batch_size >= 1


def test_an_unknown_key_with_no_close_field_gets_no_guess() -> None:
    with pytest.raises(ConfigError) as info:
        load_spec(MINIMAL + "surprise: 1\n")
    assert info.value.errors == [("surprise", "unknown key 'surprise'")]


@pytest.mark.parametrize(
    ("extra", "loc", "words"),
    [
        ("resources: {gpus: -1}", "resources.gpus", "Input should be greater than or equal to 0"),
        ("resources: {gpus: 0, gpu_memory_gb: 4}", "resources", "gpus is 0"),
        ("priority: 1000", "priority", "less than or equal to 100"),
        ("resources: {nodes: 65}", "resources.nodes", "less than or equal to 64"),
        ("surprise: 1", "surprise", "unknown key 'surprise'"),
        ("resources: {gpu: 1}", "resources.gpu", "unknown key 'gpu' (did you mean 'gpus'?)"),
        ("prority: 5", "prority", "unknown key 'prority' (did you mean 'priority'?)"),
        ("train: {max_step: 3}", "train.max_step", "(did you mean 'max_steps'?)"),
        ("train: {batch_size: 8}", "train", "set train.epochs or train.max_steps"),
        ("data: {name: imagenet}", "data", "imagenet"),
        ("model: {name: mlp, options: {depth: 3}}", "model", "depth"),
        # A CNN cannot eat the 64-feature default data.
        ("model: {name: cnn}", "", "expects samples of shape (1, 28, 28)"),
        ("entrypoint: json:dumps", "", "exactly one of model or entrypoint"),
        ("name: 'has spaces'", "name", "pattern"),
        ("resources: {gpus: 1, gpu_memory_gb: .inf}", "resources.gpu_memory_gb", "finite"),
        ("resources: {gpus: 1, gpu_memory_gb: lots}", "resources.gpu_memory_gb", "or 'auto'"),
        ("resources: {gpus: 1, gpu_memory_gb: Auto}", "resources.gpu_memory_gb", "or 'auto'"),
        ("resources: {gpus: 1, gpu_memory_gb: -2}", "resources.gpu_memory_gb", "or equal to 0"),
        ("resources: {gpus: 1, gpu_memory_gb: 2000}", "resources.gpu_memory_gb", "1024"),
        ("resources: {gpus: 0, gpu_memory_gb: auto}", "resources", "auto but gpus is 0"),
        ("resources: {memory_gb: .nan}", "resources.memory_gb", "finite"),
    ],
)
def test_bad_fields_are_named(extra: str, loc: str, words: str) -> None:
    base = dict(line.split(": ", 1) for line in MINIMAL.strip().splitlines())
    key, value = extra.split(": ", 1)
    base[key] = value
    text = "\n".join(f"{k}: {v}" for k, v in base.items())
    with pytest.raises(ConfigError) as info:
        load_spec(text)
    assert any(
        (not loc or got_loc == loc) and words.lower() in msg.lower()
        for got_loc, msg in info.value.errors
    ), info.value.errors


@pytest.mark.parametrize(("written", "kept"), [("auto", "auto"), ("6", 6.0), ("'6.5'", 6.5)])
def test_gpu_memory_is_a_number_or_auto_and_survives_the_store(
    written: str, kept: float | str
) -> None:
    spec = load_spec(MINIMAL + f"resources: {{gpus: 1, gpu_memory_gb: {written}}}\n")
    assert spec.resources.gpu_memory_gb == kept
    assert spec.resources.gpu_memory_auto == (kept == "auto")
    assert spec.resources.gpu_memory_bytes == (None if kept == "auto" else int(kept * 2**30))
    assert stored_spec(spec.model_dump_json()) == spec


def _user_package(root: Path) -> Path:
    """A package ``userpkg`` whose import would leave a marker file: importing it is visible."""
    marker = root / "imported"
    pkg = root / "userpkg"
    pkg.mkdir()
    touch = f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n"
    (pkg / "__init__.py").write_text(touch)
    (pkg / "train.py").write_text(
        touch
        + "def main(ctx, config):\n    pass\n"
        + "def one_arg(ctx):\n    pass\n"
        + "class Trainer:\n    pass\n"
        + "if True:\n    def conditional(ctx, config):\n        pass\n"
    )
    return marker


@pytest.mark.parametrize(
    ("entrypoint", "problem"),
    [
        ("userpkg.train:main", None),
        ("userpkg.train:Trainer", None),
        ("userpkg.train:conditional", None),
        ("userpkg.nope:main", "cannot find module 'userpkg.nope' on the job's Python path"),
        ("nope_nope:fn", "cannot find module 'nope_nope'"),
        ("userpkg.train:missing", "defines no 'missing' at its top level"),
        ("userpkg.train:one_arg", "must accept two arguments (ctx, config)"),
    ],
)
def test_entrypoint_is_checked_without_running_user_code(
    tmp_path: Path, entrypoint: str, problem: str | None
) -> None:
    marker = _user_package(tmp_path)
    text = f"name: t\ntrain: {{max_steps: 1}}\nentrypoint: {entrypoint}\n"
    if problem is None:
        assert load_spec(text, [str(tmp_path)]).entrypoint == entrypoint
    else:
        with pytest.raises(ConfigError) as info:
            load_spec(text, [str(tmp_path)])
        assert info.value.errors[0][0] == "entrypoint"
        assert problem in info.value.errors[0][1]
    assert not marker.exists(), f"user code ran: {marker.read_text()}"
    assert "userpkg" not in sys.modules


def test_yaml_errors_name_the_line() -> None:
    with pytest.raises(ConfigError, match="line 2, column 8"):
        load_spec("name: t\n  train: 1\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_spec("- just\n- a list\n")


def test_cli_validate_exit_codes_and_messages(tmp_path: Path) -> None:
    runner = CliRunner()
    good = runner.invoke(app, ["validate", str(REPO / "configs/train/mlp_synthetic.yaml")])
    assert good.exit_code == 0, good.output
    assert "valid" in good.output
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(MINIMAL + "resources: {gpus: -1}\n")
    bad = runner.invoke(app, ["validate", str(bad_file)])
    assert bad.exit_code == 2
    assert "resources.gpus: Input should be greater than or equal to 0" in bad.output
    missing = runner.invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2
    assert "cannot read" in missing.output
