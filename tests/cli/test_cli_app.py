"""The command line itself: fast --help, one-line fatal errors, --debug, the progress display."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from rich.console import Console

from cli import console as cli_console
from flows.errors import UserError

CLI = str(Path(sys.executable).parent / "cxr-screen")
REPO = Path(__file__).resolve().parents[2]

COMMANDS = [
    [],
    ["screen"],
    ["nightly"],
    ["train"],
    ["demo"],
    ["serve"],
    ["query"],
    ["review"],
    ["model"],
    ["model", "info"],
    ["model", "import"],
    ["db"],
    ["db", "upgrade"],
    ["fanout"],
    ["fanout", "run"],
    ["fanout", "register"],
]


def cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "CXR_SCREEN_"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        CXR_SCREEN_HOME=str(tmp_path / "cxr"),
        CXR_SCREEN_HMAC_KEY="cli-app-test-key",
        **extra,
    )
    return env


def run_cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 300):
    return subprocess.run(
        [CLI, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


# --- --help ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cxr-screen")
def test_every_help_works(command, tmp_path):
    proc = run_cli([*command, "--help"], cli_env(tmp_path), tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "Usage: cxr-screen" in proc.stdout


def test_loading_the_cli_loads_no_heavy_library():
    """What keeps --help fast: registering the commands imports neither Prefect, torch,
    SQLAlchemy nor the flows (they load when a command runs)."""
    code = (
        "import sys, cli.app; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'prefect', 'torch', 'sqlalchemy', 'pydicom', 'numpy', 'pandas', 'tasks', 'model'}), "
        "sorted(m for m in sys.modules if m.startswith('flows')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "[] ['flows', 'flows.errors']", out


def test_fanout_option_defaults_are_the_flows():
    """The fan-out options default to flows.fanout's names; their help says the same."""
    from typer.testing import CliRunner

    from cli.fanout import app
    from flows import fanout

    text = CliRunner().invoke(app, ["register", "--help"], env={"COLUMNS": "200"}).output
    assert f"(default: {fanout.WORK_POOL})" in text
    assert f"(default: {fanout.SHARD_QUEUE})" in text
    assert f"(default: {fanout.CONTROL_QUEUE})" in text
    text = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "200"}).output
    assert f"at most {fanout.MAX_IN_FLIGHT_CAP}," in text


# --- fatal errors and --debug through the real command ----------------------------------------


def test_missing_model_is_one_line_and_debug_shows_the_traceback(tmp_path):
    missing = tmp_path / "missing.pt"
    plain = run_cli(["model", "info", str(missing)], cli_env(tmp_path), tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip() == f"error: checkpoint '{missing}' does not exist or is not a file"

    for args, env in (
        (["--debug", "model", "info", str(missing)], cli_env(tmp_path)),
        (["model", "info", str(missing)], cli_env(tmp_path, CXR_SCREEN_DEBUG="1")),
    ):
        debug = run_cli(args, env, tmp_path)
        assert debug.returncode == 2
        lines = debug.stderr.strip().splitlines()
        assert lines[0] == "Traceback (most recent call last):", debug.stderr
        assert "in load_checkpoint" in debug.stderr  # where it was raised
        assert lines[-1] == plain.stderr.strip()  # and the same one line last


@pytest.mark.timeout(300)
def test_missing_source_is_refused_before_anything_starts(tmp_path):
    """Checked before the Prefect server starts and torch loads: one line at once, and
    --debug shows where the command refused it."""
    from support import make_model

    model = make_model(tmp_path / "model.pt")
    missing = tmp_path / "no-such-folder"
    args = ["screen", str(missing), "--model", str(model), "--db", f"sqlite:///{tmp_path}/r.db"]
    plain = run_cli(args, cli_env(tmp_path), tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip() == f"error: source does not exist: {missing}"
    assert not (tmp_path / "prefect" / "cxr-screen-server.log").exists()  # no server started
    assert not (tmp_path / "r.db").exists()  # nothing written
    debug = run_cli(["--debug", *args], cli_env(tmp_path), tmp_path)
    assert debug.returncode == 2, debug.stderr[-3000:]
    lines = debug.stderr.strip().splitlines()
    assert lines[-1] == f"error: source does not exist: {missing}", debug.stderr[-3000:]
    assert lines[0] == "Traceback (most recent call last):"
    assert "in check_options" in debug.stderr and "cli/screen.py" in debug.stderr


# --- fatal_reason and exit_on_error -------------------------------------------------------------


def test_fatal_reason_says_user_errors_plainly_and_names_the_rest():
    import sqlalchemy as sa

    from model.checkpoint import CheckpointError
    from tasks.training_data import TrainingDataError

    class PlanError(UserError):
        pass

    assert cli_console.fatal_reason(PlanError("no model given\nsecond line")) == "no model given"
    assert cli_console.fatal_reason(CheckpointError("checkpoint 'x' refused")) == (
        "checkpoint 'x' refused"
    )
    assert cli_console.fatal_reason(TrainingDataError("no usable image")) == "no usable image"
    refused = sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("port 5432 refused"))
    assert cli_console.fatal_reason(refused) == (
        "the results database is unreachable: port 5432 refused"
    )
    assert cli_console.fatal_reason(KeyError("sources")) == "KeyError: 'sources'"


def test_exit_on_error_lets_a_decided_exit_through(capsys):
    with pytest.raises(typer.Exit) as caught, cli_console.exit_on_error():
        raise typer.Exit(3)
    assert caught.value.exit_code == 3
    with pytest.raises(typer.Exit) as caught, cli_console.exit_on_error():
        raise UserError("the drop folder /x does not exist")
    assert caught.value.exit_code == 2
    assert capsys.readouterr().err.strip() == "error: the drop folder /x does not exist"
    with pytest.raises(ValueError), cli_console.exit_on_error(UserError):
        raise ValueError("not ours")


# --- the one progress display -------------------------------------------------------------------


def test_progress_draws_every_flow_event():
    from flows.progress import report

    buffer = io.StringIO()
    target = Console(file=buffer, width=200, force_terminal=False)
    with cli_console.PipelineProgress(target=target) as shown:
        report("demo-stage", key="archive", label="writing archive", total=None)
        report("demo-stage", key="archive", label="writing archive", done=True)
        report("train-data", stage="scan", done=10, total=None)
        report("train-data", stage="decode", done=4, total=8)
        report("train-epoch", epochs=2, epoch=1, train_loss=0.5, val_auroc=None)
        report("train-done")
        report("start", run_id=7, total=20)
        report("shard", seen=10, counts={"predicted": 8, "skipped": 1, "failed": 1})
        report("done", run_id=7)
        report("an-event-nobody-draws", anything=1)
        tasks = {t.description: t for t in shown.progress.tasks}
    assert set(tasks) == {
        "writing archive",
        "reading headers",
        "decoding images",
        "training (epochs)",
        "screening",
    }
    assert tasks["screening"].finished and tasks["screening"].completed == 10
    assert "predicted 8 skipped 1 failed 1" in tasks["screening"].fields["detail"]
    assert "files/s" in tasks["screening"].fields["detail"]
    assert "val AUROC n/a" in tasks["training (epochs)"].fields["detail"]
    # the listener is gone with the block
    report("shard", seen=20, counts={})
    assert shown.progress.tasks[-1].completed == 10
