"""Config loading and validation: unknown keys and bad values are errors that name the key."""

from pathlib import Path

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import Config, from_dict, load_config
from pipeline.errors import ConfigError


def test_defaults_validate_and_flatten():
    cfg = from_dict({"experiment": "x"})
    flat = cfg.flat()
    assert flat["finetune.strategy"] == "linear-probe"
    assert flat["prepare.size"] == "[224, 224]"
    assert all(len(v) <= 500 for v in flat.values())
    assert cfg.hash() == from_dict({"experiment": "x"}).hash() != from_dict({"experiment": "y"}).hash()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"experimnt": "x"}, r"experimnt: unknown key \(did you mean 'experiment'\?\)"),
        ({"prepare": {"presett": "xray"}}, r"prepare.presett: unknown key \(did you mean 'preset'\?\)"),
        ({"prepare": {"preset": "ct-lungs"}}, r"prepare.preset: 'ct-lungs' is not one of .*did you mean 'ct-lung'"),
        ({"finetune": {"strategy": "gradul"}}, r"did you mean 'gradual'"),
        ({"finetune": {"lr": "fast"}}, r"finetune.lr: expected a finite number, got 'fast'"),
        ({"finetune": {"epochs": 0}}, r"finetune.epochs: must be ≥ 1"),
        ({"data": {"split": {"val": 0.6, "test": 0.5}}}, r"data.split: .*val \+ test < 1"),
        ({"prepare": {"dims": "3d", "size": [224, 224]}}, r"prepare.size: 3d needs \[D, H, W\]"),
    ],
)
def test_bad_config_names_the_key(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        from_dict({"experimnt": "x", "model": {"backbon": "r"}, "finetune": {"lr": "a"}})
    text = str(info.value)
    assert "experimnt" in text and "model.backbon" in text and "finetune.lr" in text


def test_relative_paths_resolve_against_config_folder(tmp_path: Path):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "e.yaml"
    path.write_text("experiment: e\ndata: {source: ../archive, labels: ../labels.csv, manifest: m}\n")
    cfg = load_config(path)
    assert cfg.data.source == str((tmp_path / "archive").resolve())
    assert cfg.data.manifest == str((tmp_path / "cfg" / "m").resolve())


def test_cli_exits_2_with_message_on_bad_config(tmp_path: Path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("experiment: e\nfinetune: {stratgy: gradual}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "finetune.stratgy: unknown key (did you mean 'strategy'?)" in err
    assert "Traceback" not in err


def test_cli_exits_2_on_missing_config_and_invalid_yaml(tmp_path: Path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    bad = tmp_path / "broken.yaml"
    bad.write_text("experiment: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_config_is_a_dataclass_with_sections():
    cfg = Config()
    assert set(cfg.as_dict()) == {"experiment", "data", "prepare", "model", "finetune", "evaluate", "tracking"}


def test_debug_shows_the_cause_of_an_error(tmp_path: Path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("experiment: [unclosed\n")
    assert main(["train", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert main(["--debug", "train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "yaml.parser.ParserError" in err  # the cause, kept with `raise ... from exc`
    assert "direct cause of the following exception" in err
    assert "ConfigError: " in err


def test_config_choices_match_the_stages_that_implement_them():
    """A preset, dims, strategy or calibration method is added in the stage and the config together."""
    import typing

    from pipeline.adapt.registry import DIMS
    from pipeline.config import EvaluateConfig, FinetuneConfig, PrepareConfig
    from pipeline.evaluate import CALIBRATORS, CHOICES
    from pipeline.finetune.freezing import STRATEGIES
    from pipeline.prepare import PRESETS, REDUCTIONS

    def choices(cls: type, name: str) -> set[str]:
        return set(typing.get_args(typing.get_type_hints(cls)[name]))

    assert choices(PrepareConfig, "preset") == set(PRESETS)
    assert choices(PrepareConfig, "dims") == set(DIMS)
    assert choices(PrepareConfig, "reduce") == set(REDUCTIONS)
    assert choices(FinetuneConfig, "strategy") == set(STRATEGIES)
    assert choices(EvaluateConfig, "calibration") == set(CHOICES) == {*CALIBRATORS, "auto"}


@pytest.mark.parametrize(("text", "shape"), [("- a\n- b\n", "list"), ("just a string\n", "str"), ("42\n", "int")])
def test_a_yaml_whose_top_level_is_not_a_mapping_exits_2(tmp_path: Path, capsys, text, shape):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "the top level must be a mapping of keys" in err and f"got a {shape}" in err and "Traceback" not in err


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_are_rejected(value):
    with pytest.raises(ConfigError, match=r"finetune\.lr: expected a finite number"):
        from_dict({"finetune": {"lr": yaml.safe_load(value)}})


def test_a_config_error_is_reported_before_torch_or_mlflow_is_imported(tmp_path: Path):
    """A misspelled key must fail in about a second: no heavy import happens before validation."""
    import subprocess
    import sys

    bad = tmp_path / "c.yaml"
    bad.write_text("experiment: x\nfinetune: {lrr: 0.1}\n")
    code = (
        "import sys; from pipeline.cli import main\n"
        f"for cmd in ('train', 'run', 'evaluate'):\n"
        f"    args = [cmd, {str(bad)!r}] + (['--run', 'x'] if cmd == 'evaluate' else [])\n"
        "    assert main(args) == 2, cmd\n"
        "heavy = sorted(m for m in ('torch', 'mlflow', 'monai') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("finetune.lrr: unknown key (did you mean 'lr'?)") == 3
