"""Interrupts through the real command: SIGINT and SIGTERM, to ``cxr-screen screen`` alone, to
its process group (a terminal's Ctrl-C, ``kill -- -PGID``) and to every process it started
(systemd stopping a unit's control group), once at least one shard has committed. The
command that gets SIGINT alone is started as a shell starts a background job, with SIGINT
ignored (it used to go on ignoring it and finish the run).

Each trial checks what a user and the engineer on call see: the command ends within 10 s with
130 or 143 and one line on stderr naming the run and how far it got; the run is closed
``interrupted`` with counts equal to its committed rows; no new shard started after the
signal; the database is consistent; no process of the command is left (decode workers,
resource tracker, its temporary Prefect server); and running the same command again gives
exactly the rows of an uninterrupted run. The command starts its own temporary Prefect server
(no ``PREFECT_API_URL``): that server receiving the same signal is the case that used to hang.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
from reliability_support import (
    Cli,
    cli_env,
    consistency_problems,
    differences,
    make_model,
    result_rows,
    run_cli,
)
from support import scratch_postgres_database

from tasks.dicom import synth

SHARD = 8
ARGS = ["--shard-size", str(SHARD), "--workers", "1"]
STOP_WITHIN_S = 10.0
LINE = re.compile(
    r"interrupted by (SIGINT|SIGTERM): run (\d+) stopped after (\d+) shards? \((\d+) files?\); "
    r"run the same command again to finish"
)
MARK = "CXR_INTERRUPT_TEST_MARK"  # in the environment of every process the command starts

# (database, signal, target): both signals to the command and to its group, spread over both
# databases, and one stop of every process (systemd's KillMode=control-group).
CASES = [
    ("sqlite", signal.SIGINT, "process"),
    ("sqlite", signal.SIGTERM, "group"),
    ("sqlite", signal.SIGTERM, "every process"),
    ("postgresql", signal.SIGTERM, "process"),
    ("postgresql", signal.SIGINT, "group"),
]


SIGINT_ALONE = (signal.SIGINT, "process")


def _ignore_sigint() -> None:  # preexec_fn: what a shell does for a background job
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Setup:
    corpus: Path
    model: Path
    home: Path
    n_files: int

    def env(self, mark: str) -> dict[str, str]:
        """One home for every run (same HMAC key, same thumbnail folder), no Prefect API:
        the command starts its own temporary server."""
        env = cli_env(self.home, "", **{MARK: mark})
        del env["PREFECT_API_URL"]
        return env

    def args(self, url: str) -> list[str]:
        return ["screen", str(self.corpus), "--model", str(self.model), *ARGS, "--db", url]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    root = tmp_path_factory.mktemp("interrupts")
    corpus = root / "corpus"
    synth.write_corpus(
        corpus / "studies",
        112,
        seed=31,
        size_range=(96, 128),
        syntaxes=["explicit_le", "rle"],
        lateral_fraction=0.1,
    )
    (corpus / "studies" / "labels.csv").unlink()
    synth.write_broken(corpus / "broken")
    n_files = sum(1 for p in corpus.rglob("*") if p.is_file())
    return Setup(corpus, make_model(root / "model.pt"), root / "home", n_files)


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory, prefect_api_url):
    """The rows of an uninterrupted run, per database kind (made when first asked for). The
    reference run reports to the session's Prefect server: its rows are what is compared, and
    a temporary server of its own would add ~10 s to it (the trials keep theirs)."""
    made: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:

        def rows(dialect: str) -> dict:
            if dialect not in made:
                work = tmp_path_factory.mktemp(f"reference-{dialect}")
                url = (
                    f"sqlite:///{work / 'reference.db'}"
                    if dialect == "sqlite"
                    else stack.enter_context(scratch_postgres_database())
                )
                env = {**setup.env(f"ref-{uuid.uuid4().hex}"), "PREFECT_API_URL": prefect_api_url}
                done = run_cli(setup.args(url), env, work, 600)
                assert done.returncode == 0, done.stderr[-3000:]
                made[dialect] = result_rows(url)
                assert len(made[dialect]["file_outcomes"]) == setup.n_files
            return made[dialect]

        yield rows


# --- looking at the database and the processes from outside ----------------------------------


def scalar(engine: sa.Engine, sql: str, **params):
    """A value, or None while the schema does not exist yet."""
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()
    except sa.exc.DBAPIError:
        return None


def marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark``: all the command ever started."""
    found = []
    needle = f"{MARK}={mark}".encode()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle not in environ.read_bytes().split(b"\0"):
                continue
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            found.append(int(environ.parent.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def left_behind(mark: str, grace: float) -> list[str]:
    """Processes of the command still alive ``grace`` seconds on (killed, then reported)."""
    deadline = time.monotonic() + grace
    while (alive := marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    described = [f"{pid}: {cmdline(pid)[:120]}" for pid in alive]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return described


def send(cli: Cli, sig: signal.Signals, target: str, mark: str) -> None:
    if target == "process":
        os.kill(cli.pid, sig)
    elif target == "group":
        os.killpg(cli.pid, sig)  # the command leads its own group (Cli starts a session)
    else:  # every process of the command, as systemd stops a unit's control group
        for pid in marked(mark):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)


# --- the trials -------------------------------------------------------------------------------


@pytest.mark.slow  # five trials of two runs each, and two reference runs: about 3-5 minutes
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("dialect", "sig", "target"), CASES, ids=[f"{d}-{s.name}-{t}" for d, s, t in CASES]
)
def test_a_stop_signal_ends_the_run_in_order_and_running_again_finishes_it(
    dialect, sig, target, setup, reference, request, tmp_path
):
    url = (
        f"sqlite:///{tmp_path / 'results.db'}"
        if dialect == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    mark = uuid.uuid4().hex
    engine = sa.create_engine(url)
    try:
        # SIGINT to the command alone: started as a shell starts a background job
        # (`cxr-screen screen ... &`), with SIGINT ignored, which it used to keep ignoring.
        background = {"preexec_fn": _ignore_sigint} if (sig, target) == SIGINT_ALONE else {}
        cli = Cli(setup.args(url), setup.env(mark), tmp_path / "run", **background)
        try:
            # Wait until a shard of the run has committed (the schema may not exist yet).
            deadline = time.monotonic() + 300
            committed = 0
            while cli.alive() and time.monotonic() < deadline:
                committed = scalar(engine, "SELECT COUNT(*) FROM file_outcomes") or 0
                if committed >= SHARD:
                    break
                time.sleep(0.05)
            assert cli.alive(), f"the run ended before the signal: {cli.wait(5).stderr[-2000:]}"
            assert committed >= SHARD, "no shard committed within 300 s"
            servers = [p for p in marked(mark) if "cli.prefect_server" in cmdline(p)]
            assert len(servers) == 1, "the command did not start its own Prefect server"
            sent = time.monotonic()
            send(cli, sig, target, mark)
            finished = cli.wait(timeout=120)
            took = time.monotonic() - sent
        finally:
            cli.kill()
        leftovers = left_behind(mark, grace=10.0)
        print(f"{dialect} {sig.name} to {target}: stopped in {took:.2f} s")  # with -s

        # What the user sees: quick, 130/143, one line naming the run and how far it got.
        assert took < STOP_WITHIN_S, f"stopping took {took:.1f} s: {finished.stderr[-2000:]}"
        assert finished.returncode == 128 + sig, finished.stderr[-3000:]
        lines = finished.stderr.strip().splitlines()
        assert len(lines) == 1, finished.stderr[-3000:]
        said = LINE.fullmatch(lines[0])
        assert said, lines[0]
        assert said.group(1) == sig.name
        run_id, shards, files = (int(said.group(i)) for i in (2, 3, 4))
        assert finished.stdout == ""

        # The run: closed 'interrupted' after its last commit, counts equal to its rows.
        with engine.connect() as conn:
            run = conn.execute(
                sa.text("SELECT * FROM v_run_summary WHERE run_id = :r"), {"r": run_id}
            ).one()
            outcomes = dict(
                conn.execute(
                    sa.text(
                        "SELECT outcome, COUNT(*) FROM file_outcomes WHERE run_id = :r "
                        "GROUP BY outcome"
                    ),
                    {"r": run_id},
                ).all()
            )
        rows = sum(outcomes.values())
        assert run.status == "interrupted", run
        assert sig.name in run.error and "run the same command again" in run.error, run.error
        assert run.files_seen == rows == files, (run, outcomes, lines[0])
        for outcome in ("predicted", "skipped", "failed"):
            assert getattr(run, outcome) == outcomes.get(outcome, 0), (run, outcomes)
        assert shards * SHARD >= files > (shards - 1) * SHARD  # whole shards only
        # No new shard started: at most the one being written and one that committed
        # between the last look and the signal.
        assert committed <= rows <= committed + 2 * SHARD, (committed, rows)
        assert rows < setup.n_files, "the run was not stopped"
        assert consistency_problems(url) == []

        # Nothing of the command is left: workers, resource tracker, its Prefect server.
        assert leftovers == [], leftovers
        assert cli.leftovers(grace=0) == []
    finally:
        engine.dispose()

    # Running the same command again finishes the job: the rows of an uninterrupted run.
    again = run_cli(setup.args(url), setup.env(mark), tmp_path / "again", timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert differences(reference(dialect), result_rows(url)) == []
    assert consistency_problems(url) == []


@pytest.mark.timeout(300)
def test_a_stop_before_the_run_is_recorded_records_nothing(setup, tmp_path):
    """Ctrl-C while the command starts (its Prefect server booting, torch loading): one line
    saying nothing was recorded, 130, and nothing left running."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    mark = uuid.uuid4().hex
    cli = Cli(setup.args(url), setup.env(mark), tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while cli.alive() and time.monotonic() < deadline:
            if any("cli.prefect_server" in cmdline(p) for p in marked(mark)):
                break
            time.sleep(0.02)
        assert cli.alive(), cli.wait(5).stderr[-2000:]
        sent = time.monotonic()
        os.killpg(cli.pid, signal.SIGINT)
        finished = cli.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        cli.kill()
    assert left_behind(mark, grace=10.0) == []
    assert finished.returncode == 130, finished.stderr[-3000:]
    assert finished.stderr.strip() == (
        "interrupted by SIGINT before a run started: nothing was recorded"
    ), finished.stderr[-3000:]
    assert took < STOP_WITHIN_S, took
    engine = sa.create_engine(url)
    try:
        assert not scalar(engine, "SELECT COUNT(*) FROM runs")  # no table, or no row
    finally:
        engine.dispose()


# --- the pieces, in this process ---------------------------------------------------------------


def test_an_error_raised_while_a_stop_is_handled_counts_as_that_stop():
    """Prefect raises ``ValueError: Task run is not set`` when the signal lands while a task
    starts: the run must still end as interrupted, not as failed."""
    from prefect.exceptions import TerminationSignal

    from tasks.interrupts import Interrupted, signal_of

    assert signal_of(Interrupted(signal.SIGTERM)) == signal.SIGTERM
    assert signal_of(KeyboardInterrupt()) == signal.SIGINT
    assert signal_of(TerminationSignal(signal=signal.SIGTERM)) == signal.SIGTERM
    try:
        try:
            raise Interrupted(signal.SIGTERM)
        except BaseException:
            raise ValueError("Task run is not set")  # noqa: B904 - as Prefect does
    except ValueError as exc:
        assert signal_of(exc) == signal.SIGTERM
    assert signal_of(RuntimeError("the disk is full")) is None
    assert signal_of(None) is None


def test_held_delivers_a_signal_at_the_end_of_the_block_and_drops_repeats():
    from tasks import interrupts

    previous = interrupts.install()
    try:
        with pytest.raises(interrupts.Interrupted) as caught, interrupts.held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would run here without held()
            done = True
        assert done and caught.value.signum == signal.SIGTERM and caught.value.exit_code == 143
        assert interrupts.stopping() == signal.SIGTERM
        with interrupts.held():  # a stop under way: a repeat is dropped
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)  # and ignored outside held() too
        time.sleep(0.05)
    finally:
        interrupts.uninstall(previous)
        interrupts.reset()
