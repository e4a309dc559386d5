"""``cxr-screen pacs``: the real command in a subprocess against the test Orthanc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orthanc import free_port
from pacs_support import synth_file

CLI = str(Path(sys.executable).with_name("cxr-screen"))


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CXR_SCREEN_PACS")}
    return subprocess.run(
        [CLI, "pacs", *args],
        env={**base, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def pacs_env(pacs, name: str = "MAIN", password: str | None = None) -> dict[str, str]:
    return {
        f"CXR_SCREEN_PACS__{name}__URL": pacs.dicomweb_url,
        f"CXR_SCREEN_PACS__{name}__USERNAME": pacs.username,
        f"CXR_SCREEN_PACS__{name}__PASSWORD": password or pacs.password,
        f"CXR_SCREEN_PACS__{name}__RETRIES": "0",
    }


def test_echo_dicomweb_and_dimse(pacs, tmp_path):
    env = {
        **pacs_env(pacs),
        "CXR_SCREEN_PACS__OLD__URL": f"dimse://{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
    }
    out = run(["echo", "main"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"main (DICOMweb {pacs.dicomweb_url}): QIDO-RS OK in ")
    out = run(["echo", "old"], env, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "C-ECHO OK" in out.stdout


def test_echo_failures_are_one_line(pacs, tmp_path):
    wrong = "Wr0ng-Passw0rd-77"
    out = run(["echo", "main"], pacs_env(pacs, password=wrong), tmp_path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and wrong not in out.stderr
    assert "error: PACS 'main'" in out.stderr and "HTTP 401" in out.stderr

    env = {"CXR_SCREEN_PACS__GONE__URL": f"http://127.0.0.1:{free_port()}/dicom-web"}
    out = run(["echo", "gone"], env, tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "PACS 'gone'" in out.stderr and "unreachable: connection refused" in out.stderr

    env = {"CXR_SCREEN_PACS__GONE__URL": f"dimse://X@127.0.0.1:{free_port()}"}
    out = run(["echo", "gone"], env, tmp_path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "PACS 'gone' (DIMSE X@127.0.0.1:" in out.stderr and "connection refused" in out.stderr

    out = run(["echo", "nowhere"], {}, tmp_path)
    assert out.returncode == 2 and "no PACS named 'nowhere' is configured" in out.stderr


def test_list_shows_no_secret_and_reads_dotenv(pacs, tmp_path):
    (tmp_path / ".env").write_text(
        f"CXR_SCREEN_PACS__MAIN__URL={pacs.dicomweb_url}\n"
        f"CXR_SCREEN_PACS__MAIN__USERNAME={pacs.username}\n"
        f"CXR_SCREEN_PACS__MAIN__PASSWORD={pacs.password}\n"
    )
    out = run(["list", "--json"], {}, tmp_path)
    assert out.returncode == 0, out.stderr
    row = json.loads(out.stdout)
    assert row["name"] == "main" and row["auth"] == f"basic ({pacs.username})"
    assert pacs.password not in out.stdout + out.stderr
    out = run(["echo", "main"], {}, tmp_path)
    assert out.returncode == 0, out.stderr


def test_query_counts(pacs, tmp_path):
    files = [synth_file(tmp_path, study=i, modality="CR" if i % 2 else "DX") for i in range(5)]
    pacs.upload_files(f.path for f in files)
    out = run(
        ["query", "main", "--study-date", "2026-11-28", "--series", "--json"],
        pacs_env(pacs),
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    counts = json.loads(out.stdout)
    assert counts["studies"] == 5 and counts["instances_listed"] == 5
    assert counts["series_selected"] == 5 and counts["instances_announced"] == 5
    out = run(["query", "main"], pacs_env(pacs), tmp_path)
    assert out.returncode == 2 and "exactly one of --study-date" in out.stderr
