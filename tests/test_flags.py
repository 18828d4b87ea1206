"""recur/flags.py: flags from dataclass fields, help from their metadata, RECUR_* variables for serve."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from pathlib import Path

import pytest

from recur.cli import build_parser, main
from recur.flags import add_dataclass_arguments, from_args
from service.config import Settings
from training.config import TrainConfig


@dataclass
class Demo:
    verbose: bool = field(default=False, metadata={"help": "say more"})
    count: int = field(default=3, metadata={"help": "how many, 100% sure"})
    where: Path = field(default=Path("here"), metadata={"help": "a directory"})


@dataclass
class Undocumented:
    count: int = 3


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RECUR_<SETTING> from the caller's shell leaks into these tests; no wrapped help lines."""
    for f in fields(Settings):
        monkeypatch.delenv("RECUR_" + f.name.upper(), raising=False)
    for name in ("VERBOSE", "COUNT", "WHERE"):
        monkeypatch.delenv("DEMO_" + name, raising=False)
    monkeypatch.setenv("COLUMNS", "1000")


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([command, "--help"])
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def _demo(argv: list[str], env_prefix: str | None = "DEMO_") -> Demo:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo, env_prefix=env_prefix)
    return from_args(Demo, parser.parse_args(argv))


def test_serve_help_comes_from_field_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help("serve", capsys)
    for f in fields(Settings):
        assert f"{f.metadata['help']} [RECUR_{f.name.upper()}; default: {f.default}]" in out, f.name
    assert "--models-dir MODELS_DIR" in out and "[RECUR_PORT; default: 50051]" in out


def test_train_help_comes_from_field_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help("train", capsys)
    for f in fields(TrainConfig):
        assert f"{f.metadata['help']} (default: {f.default})" in out, f.name
    assert "--reset-state, --no-reset-state" in out and "--resume" in out


def test_help_may_contain_percent_signs() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Demo)
    assert "how many, 100% sure (default: 3)" in " ".join(parser.format_help().split())


def test_every_field_needs_help() -> None:
    with pytest.raises(TypeError, match=r"Undocumented\.count"):
        add_dataclass_arguments(argparse.ArgumentParser(), Undocumented)


def test_bool_flag() -> None:
    assert _demo([]).verbose is False
    assert _demo(["--verbose"]).verbose is True
    assert _demo(["--verbose", "--no-verbose"]).verbose is False
    parser = build_parser()
    assert from_args(TrainConfig, parser.parse_args(["train"])).reset_state is False
    assert from_args(TrainConfig, parser.parse_args(["train", "--reset-state"])).reset_state is True
    assert from_args(TrainConfig, parser.parse_args(["train", "--no-reset-state"])).reset_state is False


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("TRUE", True), ("yes", True), (" On ", True),
                                                 ("0", False), ("false", False), ("NO", False), ("off", False)])
def test_bool_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, expected: bool) -> None:
    monkeypatch.setenv("DEMO_VERBOSE", value)
    assert _demo([]).verbose is expected
    assert _demo(["--verbose"]).verbose is True  # the flag wins
    assert _demo(["--no-verbose"]).verbose is False


def test_bad_bool_in_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_VERBOSE", "maybe")
    with pytest.raises(ValueError, match=r"DEMO_VERBOSE='maybe'.*not a boolean"):
        _demo([])


def test_bad_variable_is_a_clean_command_line_error(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RECUR_PORT", "fifty")
    assert main(["serve"]) == 2
    assert "RECUR_PORT='fifty': not a valid int" in capsys.readouterr().err


def test_no_env_prefix_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEMO_COUNT", "9")
    assert _demo([], env_prefix=None).count == 3
    assert _demo([]).count == 9


def test_flag_beats_variable_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def max_chunk(*argv: str) -> int:
        return Settings.from_args(build_parser().parse_args(["serve", *argv])).max_chunk

    assert max_chunk() == 4096
    monkeypatch.setenv("RECUR_MAX_CHUNK", "7")
    assert max_chunk() == 7
    assert max_chunk("--max-chunk", "9") == 9


def test_path_field(monkeypatch: pytest.MonkeyPatch) -> None:
    def models_dir(*argv: str) -> Path:
        return Settings.from_args(build_parser().parse_args(["serve", *argv])).models_dir

    assert models_dir() == Path("models")
    assert models_dir("--models-dir", "a/b") == Path("a/b") and isinstance(models_dir("--models-dir", "a/b"), Path)
    monkeypatch.setenv("RECUR_MODELS_DIR", "/srv/models")
    assert models_dir() == Path("/srv/models") and isinstance(models_dir(), Path)
    assert _demo(["--where", "x"]).where == Path("x")
