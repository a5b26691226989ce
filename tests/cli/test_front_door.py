"""The ``sim`` front door (:mod:`sim_cli.main`) and ``python -m serving``'s dispatcher: every
command listed, imported only when it runs, its ``--help`` named after the caller, bad input
as one line; quickstart's in-process stages fail with the stage's name."""

from __future__ import annotations

import pytest

from serving.cli.dispatch import COMMANDS as SERVING_COMMANDS
from serving.cli.dispatch import Command, dispatch
from serving.cli.dispatch import main as serving_main
from sim_cli.main import COMMANDS
from sim_cli.main import main as sim

ALL = ("train", "eval", "export", "predict", "label", "serve", "app", "info", "quickstart")


def test_sim_lists_every_command_and_serving_only_its_own(capsys) -> None:
    assert tuple(COMMANDS) == ALL
    assert sim(["--help"]) == 0
    text = capsys.readouterr().out
    block = text.split("commands:\n")[1].split("\n\n")[0]
    listed = [line.split()[0] for line in block.splitlines()]
    assert listed == list(ALL)
    assert serving_main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: python -m serving <command>")
    assert set(SERVING_COMMANDS) == {"predict", "label", "serve", "info"}
    assert all(COMMANDS[name] is SERVING_COMMANDS[name] for name in SERVING_COMMANDS)


@pytest.mark.parametrize("name", ["train", "eval", "export", "predict", "label", "info",
                                  "quickstart"])
def test_a_commands_help_shows_the_name_it_was_called_by(name, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        sim([name, "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: sim {name} ")


def test_serving_runs_its_commands_under_its_own_name(capsys) -> None:
    with pytest.raises(SystemExit):
        serving_main(["info", "--help"])
    assert capsys.readouterr().out.startswith("usage: python -m serving info ")


def test_unknown_commands_are_one_line_with_a_hint(capsys) -> None:
    assert sim(["trian"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: unknown command 'trian' (did you mean 'train'?); 'sim --help' lists the "
        "commands")
    assert serving_main(["train"]) == 2  # not the library's: only 'sim' runs it
    assert "'python -m serving --help' lists the commands" in capsys.readouterr().err


def test_a_missing_dependency_names_the_extra(capsys) -> None:
    def load():
        raise ModuleNotFoundError("No module named 'gradio'", name="gradio")

    table = {"app": Command(load, "web app", "app")}
    assert dispatch("sim", table, ["app"], "") == 1
    assert capsys.readouterr().err.strip() == (
        "error: sim app: needs gradio, which is not installed; pip install 'sim-boxseg[app]'")


def test_a_quickstart_stage_in_process_fails_with_its_name(tmp_path, capsys) -> None:
    from serving.cli.predict import main as predict
    from training.quickstart import StageError, _command

    missing = str(tmp_path / "none.safetensors")
    with pytest.raises(StageError, match=r"stage 'predict' failed: `sim predict` exited with 1"):
        _command("predict", "predict", predict, ["--model", missing, "--input", str(tmp_path),
                                                 "--output", str(tmp_path / "o")])
    assert "none.safetensors" in capsys.readouterr().err
    with pytest.raises(StageError, match=r"`sim predict` exited with 2"):
        _command("predict", "predict", predict, ["--no-such-flag"])
