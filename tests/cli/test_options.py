"""Flags and behaviour every command shares: --version, deprecated names, one-line errors."""

from importlib.metadata import version

import pytest

from imageragturbo.cli import main
from imageragturbo.cli.main import build_parser
from imageragturbo.errors import ConfigError, ImageRagTurboError


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"imageragturbo {version('imageragturbo')}\n"


def test_index_is_a_deprecated_alias_of_database(capsys):
    parser = build_parser()
    new = parser.parse_args(["serve", "--database", "a=/x", "--database", "b=/y"])
    old = parser.parse_args(["serve", "--index", "a=/x", "--index", "b=/y"])
    assert new.databases == old.databases == ["a=/x", "b=/y"]
    err = capsys.readouterr().err
    assert err == "imageragturbo: --index is deprecated, use --database\n"  # once per command line


def test_database_without_equals_keeps_choosing_where_it_did(capsys):
    args = build_parser().parse_args(["generate", "x", "--out", "x.png", "--index", "a=/a", "--database", "a"])
    assert args.databases == ["a=/a"] and args.retrieve_from == "a"
    assert "use --retrieve-from NAME" in capsys.readouterr().err
    args = build_parser().parse_args(["generate", "x", "--out", "x.png", "--database", "a=/a", "--retrieve-from", "a"])
    assert args.databases == ["a=/a"] and args.retrieve_from == "a"
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args(["serve", "--database", "/data/art"]).databases == ["/data/art"]


def test_a_bad_database_spec_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "--database", "name="])
    assert exit.value.code == 2 and "database spec" in capsys.readouterr().err


@pytest.mark.parametrize(("old", "new"), [("build-index", "build-database"), ("check-index", "check-database")])
def test_old_command_names_still_run_and_say_so(old, new, tmp_path, capsys):
    assert main([old, str(tmp_path)] if old == "check-index" else [old, "--out", str(tmp_path / "db"), "--world", "1",
                                                                        "--model", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"imageragturbo: {old} is deprecated, use {new}"
    assert err[-1].startswith(f"imageragturbo {old}: error: ")


def test_renamed_flags(capsys):
    args = build_parser().parse_args(["train", "world", "--index-pairs", "12"])
    assert args.database_pairs == 12 and "--index-pairs is deprecated, use --database-pairs" in capsys.readouterr().err
    args = build_parser().parse_args(["generate", "x", "--out", "x.png", "--verify-index"])
    assert args.verify_database is True and "--verify-index is deprecated, use --verify-database" in capsys.readouterr().err


def test_library_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, tmp_path, capsys):
    from imageragturbo.cli import generate

    def refuse(args):
        raise ConfigError("no good (test)")

    monkeypatch.setattr(generate, "run", refuse)
    # the handler was bound when the parser was built: patch the module, then parse
    assert main(["generate", "x", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err == "imageragturbo generate: error: no good (test)\n"

    def bug(args):
        raise ValueError("a bug (test)")

    monkeypatch.setattr(generate, "run", bug)
    with pytest.raises(ValueError, match="a bug"):
        main(["generate", "x", "--out", str(tmp_path / "x.png")])


def test_every_library_error_class_is_an_imageragturbo_error():
    from imageragturbo.benchmarks import BenchError
    from imageragturbo.cli.options import CliError
    from imageragturbo.engines.export import ExportError
    from imageragturbo.engines.protocol import EngineLoadError, StaleExportError
    from imageragturbo.retrieval.build import DatabaseBuildError
    from imageragturbo.retrieval.disk import DatabaseLoadError
    from imageragturbo.retrieval.pairs import PairSourceError
    from imageragturbo.model.loading import ModelLoadError
    from imageragturbo.service.batcher import BatchFailedError, QueueFullError, ShuttingDownError
    from imageragturbo.training.world_recipe import RecipeError

    for cls in (BenchError, CliError, ExportError, EngineLoadError, StaleExportError, DatabaseBuildError, DatabaseLoadError,
                PairSourceError, ModelLoadError, BatchFailedError, QueueFullError, ShuttingDownError, RecipeError):
        assert issubclass(cls, ImageRagTurboError), cls


def test_light_mode_names_match_the_model():
    from imageragturbo.model.denoiser import MODES
    from imageragturbo.modes import MODES as LIGHT

    assert LIGHT == MODES
