"""The `dreamrt` command: dispatch, help, and one-paragraph errors with exit code 2."""

import subprocess
import sys
from pathlib import Path

import pytest

from dreamrt.cli.main import main


def test_global_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("episodes info", "episodes verify", "bench episodes"):
        assert name in out


def test_command_help_shows_its_config(capsys):
    assert main(["episodes", "info", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: dreamrt episodes info PATH" in out
    assert "path: ???" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["episods", "info"], "Did you mean 'episodes info'?"),
        (["episodes", "info"], "needs a value for 'path'"),
        (["episodes", "info", "/x", "pth=/y"], "has no config key 'pth'. Did you mean 'path'?"),
        (["episodes", "info", "/x", "/y"], "Unexpected argument(s) ['/y']"),
        (["episodes", "info", "/x", "--frobnicate"], "Unknown option '--frobnicate'"),
    ],
)
def test_user_mistakes_exit_2_with_a_clear_message(argv, expected, capsys):
    assert main(argv) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert expected in err
    assert "Traceback" not in err


def test_missing_store_is_a_user_error_not_a_traceback(tmp_path):
    missing = tmp_path / "nowhere.zarr"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "dreamrt"), "episodes", "info", str(missing)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nowhere.zarr" in proc.stderr
