"""Helpers for the reliability tests: running the real CLI, private PostgreSQL clusters, and
comparing results databases."""

from __future__ import annotations

import contextlib
import ctypes
import glob
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa
from support import make_model as make_model

from tasks.dicom import synth

HMAC_KEY = "reliability-hmac-7f3c9e41d2b8a6057e1c"  # planted: must never appear in any output


def cli_path() -> str:
    """The ``cxr-screen`` console script of the Python running the tests."""
    script = Path(sys.executable).parent / "cxr-screen"
    if script.exists():
        return str(script)
    found = shutil.which("cxr-screen")
    if found is None:
        raise FileNotFoundError("the cxr-screen console script is not installed")
    return found


def cli_env(home: Path, api_url: str, **extra: str) -> dict[str, str]:
    """A clean environment for one CLI process: its own homes, the test Prefect server."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(home / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "CXR_SCREEN_HOME": str(home / "cxr"),
        "CXR_SCREEN_HMAC_KEY": HMAC_KEY,
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.update(extra)
    return env


def drop_file_permission_override() -> None:
    """preexec_fn: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so
    that the program about to run (as root) obeys file permissions like an ordinary user."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_capbset_drop = 24
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(pr_capbset_drop, cap, 0, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_CAPBSET_DROP, {cap}): {os.strerror(err)}")


@dataclass
class Finished:
    """A finished CLI process."""

    returncode: int
    stdout: str
    stderr: str
    max_rss_kib: int  # peak RSS of the process or the largest of its waited-for children
    seconds: float


class Cli:
    """One ``cxr-screen`` process in its own process group, with its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], workdir: Path, **popen) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        fd_out, self._out = tempfile.mkstemp(prefix="stdout-", dir=workdir)
        fd_err, self._err = tempfile.mkstemp(prefix="stderr-", dir=workdir)
        self.started = time.monotonic()
        with os.fdopen(fd_out, "wb") as out, os.fdopen(fd_err, "wb") as err:
            self.proc = subprocess.Popen(
                [cli_path(), *args],
                env=env,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
                **popen,
            )
        self.pid = self.proc.pid
        self._result: Finished | None = None

    def alive(self) -> bool:
        """Still running (an exited child stays a zombie until ``wait`` reaps it)."""
        return self._result is None and _exists(self.pid) and not _zombie(self.pid)

    def kill(self) -> None:
        """SIGKILL the CLI process itself (not its group): what the OOM killer does."""
        if self._result is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> Finished:
        if self._result is not None:
            return self._result
        timer = threading.Timer(timeout, self.kill)
        timer.start()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        finally:
            timer.cancel()
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code  # reaped here: Popen must not wait for it again
        self._result = Finished(
            code,
            Path(self._out).read_text(errors="replace"),
            Path(self._err).read_text(errors="replace"),
            usage.ru_maxrss,
            time.monotonic() - self.started,
        )
        return self._result

    def leftovers(self, grace: float = 30.0) -> list[int]:
        """Processes of this CLI's group still alive ``grace`` seconds after it ended (then
        killed, so that a test never leaves processes behind)."""
        deadline = time.monotonic() + grace
        while True:
            alive = _group_members(self.pid)
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return alive


def process_alive(pid: int) -> bool:
    """The process exists and has not exited (a zombie has)."""
    return _exists(pid) and not _zombie(pid)


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group."""
    return _group_members(pgid)


def _exists(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat_file in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat_file).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append(int(stat_file.split("/")[2]))
    return members


def run_cli(args: list[str], env: dict[str, str], workdir: Path, timeout: float = 900, **kw):
    return Cli(args, env, workdir, **kw).wait(timeout)


# --- a corpus, and a view of a run from the database's side ---------------------------------

SHARD_TABLES = ("instances", "file_outcomes", "image_predictions", "study_predictions")


def write_corpus(root: Path) -> int:
    """Chest studies in four syntaxes, broken and unselected files, and a zip: 70-odd files,
    small images (the cost of a trial is the process start-up, not the pixels)."""
    synth.write_corpus(
        root / "studies",
        36,
        seed=21,
        size_range=(128, 192),
        syntaxes=["explicit_le", "rle", "jpeg_ls", "j2k_lossless"],
        lateral_fraction=0.25,
    )
    (root / "studies" / "labels.csv").unlink()
    synth.write_broken(root / "broken")
    synth.write_unselected(root / "unselected")
    extra = root.parent / "zip_src"
    synth.write_corpus(extra, 6, seed=22, size_range=(128, 192), lateral_fraction=0.0)
    with zipfile.ZipFile(root / "archive.zip", "w") as zf:
        for f in sorted(extra.rglob("*.dcm")):
            zf.write(f, f.relative_to(extra).as_posix())
    return sum(1 for p in root.rglob("*") if p.is_file()) - 1 + 6


class Watcher:
    """Looks at the results database from outside while a run goes on."""

    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.conn = self.engine.connect()

    def close(self) -> None:
        self.conn.close()
        self.engine.dispose()

    def scalar(self, sql: str, **params):
        try:
            return self.conn.execute(sa.text(sql), params).scalar()
        except sa.exc.ProgrammingError:  # the schema does not exist yet
            return None

    def last_run(self) -> int:
        return self.scalar("SELECT COALESCE(MAX(run_id), 0) FROM runs") or 0

    def rows_of(self, run_id: int) -> int:
        return self.scalar("SELECT COUNT(*) FROM file_outcomes WHERE run_id = :r", r=run_id) or 0

    def shard_transaction(self) -> str | None:
        """The xid of a transaction of another session now writing a shard, if any."""
        rows = self.conn.execute(
            sa.text(
                "SELECT backend_xid::text, query FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_xid IS NOT NULL"
            )
        ).all()
        for xid, query in rows:
            if any(t in (query or "") for t in SHARD_TABLES):
                return xid
        return None

    def status(self, xid: str) -> str:
        return self.scalar(
            "SELECT pg_xact_status((((pg_snapshot_xmax(pg_current_snapshot())::text::bigint "
            ">> 32) << 32) | CAST(:xid AS bigint))::text::xid8)",
            xid=xid,
        )


# --- PostgreSQL --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateCluster:
    """A throw-away PostgreSQL cluster (initdb + pg_ctl) that a test may restart at will.

    The shared server at 127.0.0.1:5432 is never touched. initdb refuses to run as root, so
    as root the cluster belongs to the ``postgres`` OS user.
    """

    def __init__(self, base: Path | None = None) -> None:
        bins = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
            key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
        )
        pg_ctl = bins[-1] if bins else shutil.which("pg_ctl")
        if pg_ctl is None:
            raise FileNotFoundError(
                "pg_ctl/initdb not found (looked in /usr/lib/postgresql/*/bin and PATH): "
                "install the PostgreSQL server package"
            )
        self.bin = Path(pg_ctl).parent
        self.dir = Path(tempfile.mkdtemp(prefix="cxr-pg-", dir=base))
        self.data = self.dir / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user, self.user)
        self._run(
            "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "-E",
            "UTF8", "--locale=C.UTF-8",
        )  # fmt: skip
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str, timeout: float = 300) -> None:
        subprocess.run(
            [str(self.bin / tool), *args],
            check=True,
            capture_output=True,
            timeout=timeout,
            user=self.user,
            cwd=self.dir,
        )

    def _ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(
            "pg_ctl", action, "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
            "-t", "120", "-o", options, *extra,
        )  # fmt: skip

    def start(self) -> None:
        self._ctl("start")

    def restart(self, down: float = 0.0) -> None:
        """Fast shutdown (open transactions are rolled back, connections cut), ``down``
        seconds without a server, then start again."""
        self._ctl("stop", "-m", "fast")
        time.sleep(down)
        self.start()

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._ctl("stop", "-m", "immediate")

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --- comparing results databases ---------------------------------------------------------------

# Per table: its key (for sorting) and the columns that identify a run or a moment rather than
# a result (left out of the comparison).
RESULT_TABLES = {
    "models": (["sha256"], {"model_id", "created_at"}),
    "instances": (["sop_instance_uid"], {"first_seen_run_id", "created_at"}),
    "studies": (["study_instance_uid"], {"first_seen_run_id", "created_at"}),
    "file_outcomes": (["source_uri", "model_id"], {"run_id", "updated_at"}),
    "image_predictions": (["sop_instance_uid", "model_id"], {"run_id", "predicted_at"}),
    "study_predictions": (["study_instance_uid", "model_id"], {"run_id", "predicted_at"}),
    "uid_conflicts": (
        ["sop_instance_uid", "new_source_uri"],
        {"conflict_id", "run_id", "detected_at"},
    ),
    "reviews": (["review_id"], set()),
    "watermarks": (["name"], {"run_id", "updated_at", "value", "detail"}),
}
SCORE_TOLERANCE = 1e-5  # batch composition may change the last bits of a float32 score


def result_rows(url: str) -> dict[str, list[dict]]:
    """Every result table's rows (sorted by key), without run ids and timestamps."""
    engine = sa.create_engine(url)
    out: dict[str, list[dict]] = {}
    try:
        with engine.connect() as conn:
            for table, (key, ignored) in RESULT_TABLES.items():
                rows = conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY {', '.join(key)}"))
                out[table] = [
                    {k: v for k, v in r._mapping.items() if k not in ignored} for r in rows
                ]
    finally:
        engine.dispose()
    return out


def differences(expected: dict[str, list[dict]], actual: dict[str, list[dict]]) -> list[str]:
    """What differs between two ``result_rows`` snapshots (scores within SCORE_TOLERANCE)."""
    problems: list[str] = []
    for table, (key, _) in RESULT_TABLES.items():
        want = {tuple(r[k] for k in key): r for r in expected[table]}
        got = {tuple(r[k] for k in key): r for r in actual[table]}
        if len(got) != len(actual[table]):
            problems.append(f"{table}: duplicate keys")
        for k in sorted(set(want) - set(got), key=str)[:5]:
            problems.append(f"{table}: missing {k}")
        for k in sorted(set(got) - set(want), key=str)[:5]:
            problems.append(f"{table}: unexpected {k}")
        for k in sorted(set(want) & set(got), key=str):
            a, b = want[k], got[k]
            for col in a:
                x, y = a[col], b[col]
                if isinstance(x, float) and isinstance(y, float):
                    if not math.isclose(x, y, rel_tol=0, abs_tol=SCORE_TOLERANCE):
                        problems.append(f"{table} {k}: {col} {x} != {y}")
                elif x != y:
                    problems.append(f"{table} {k}: {col} {x!r} != {y!r}")
    return problems


def consistency_problems(url: str) -> list[str]:
    """Invariants a results database must hold after any crash: every prediction has its
    instance and its 'predicted' outcome, every predicted outcome its prediction, and every
    study prediction equals a fresh aggregation of its images (no half-written shard)."""
    checks = {
        "prediction without instance": """
            SELECT COUNT(*) FROM image_predictions p
            LEFT JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid
            WHERE i.sop_instance_uid IS NULL""",
        "prediction without a 'predicted' outcome": """
            SELECT COUNT(*) FROM image_predictions p
            WHERE NOT EXISTS (SELECT 1 FROM file_outcomes o WHERE o.model_id = p.model_id
                AND o.sop_instance_uid = p.sop_instance_uid AND o.outcome = 'predicted')""",
        "'predicted' outcome without prediction": """
            SELECT COUNT(*) FROM file_outcomes o
            WHERE o.outcome = 'predicted' AND NOT EXISTS (SELECT 1 FROM image_predictions p
                WHERE p.model_id = o.model_id AND p.sop_instance_uid = o.sop_instance_uid)""",
        "study prediction that is not the aggregate of its images": """
            SELECT COUNT(*) FROM study_predictions s
            LEFT JOIN (SELECT study_instance_uid, model_id, COUNT(*) AS n, MAX(score) AS score
                       FROM image_predictions GROUP BY study_instance_uid, model_id) a
              ON a.study_instance_uid = s.study_instance_uid AND a.model_id = s.model_id
            WHERE a.n IS NULL OR a.n <> s.n_images OR abs(a.score - s.score) > 1e-9""",
        "predicted study without study prediction": """
            SELECT COUNT(*) FROM (SELECT DISTINCT study_instance_uid, model_id
                                  FROM image_predictions) p
            WHERE NOT EXISTS (SELECT 1 FROM study_predictions s WHERE
                s.study_instance_uid = p.study_instance_uid AND s.model_id = p.model_id)""",
        "instance without study": """
            SELECT COUNT(*) FROM instances i
            WHERE NOT EXISTS (SELECT 1 FROM studies s
                              WHERE s.study_instance_uid = i.study_instance_uid)""",
    }
    engine = sa.create_engine(url)
    problems = []
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("image_predictions"):
                return []  # killed before (or while) the schema was created: nothing to check
            for name, sql in checks.items():
                n = conn.execute(sa.text(sql)).scalar_one()
                if n:
                    problems.append(f"{n} x {name}")
    finally:
        engine.dispose()
    return problems
