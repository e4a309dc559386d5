"""A real Orthanc PACS for tests: Debian's ``/usr/sbin/Orthanc`` as a plain process on loopback.

``Orthanc(workdir).start()`` writes a private configuration (its own storage, free loopback
ports for HTTP and DICOM, the DICOMweb plugin on, HTTP basic authentication with a test user so
that wrong-credential tests are real, remote access off) and waits until ``/system`` answers.
Modalities (our C-STORE SCPs, so that C-MOVE works) are registered at start or later through
the REST API (``register_modality``). Files are loaded with ``POST /instances``.

Importable from tests under ``tests/pacs`` as ``orthanc`` (pytest puts this folder on the path)::

    from orthanc import Orthanc
    with Orthanc(tmp_path / "pacs") as pacs:
        pacs.upload_files(paths)
        requests.get(pacs.dicomweb_url + "/studies", auth=pacs.auth)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INSTALL_HINT = (
    "install Debian's orthanc and orthanc-dicomweb packages "
    "(`apt-get install orthanc orthanc-dicomweb`; `make test` does it when they are missing)"
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL when the test process dies, so no orphan is left."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def require_orthanc() -> None:
    """Raise with the way to install Orthanc when the binary or its DICOMweb plugin is missing."""
    missing = [p for p in (ORTHANC_BINARY, DICOMWEB_PLUGIN) if not os.path.exists(p)]
    if missing:
        raise RuntimeError(
            f"Orthanc is not installed ({', '.join(missing)} missing): {INSTALL_HINT}"
        )


@dataclass(frozen=True)
class Modality:
    """A DICOM peer Orthanc knows: the destination of a C-MOVE, or a C-FIND/C-GET caller."""

    aet: str
    host: str
    port: int


class Orthanc:
    """One Orthanc process with its own storage and configuration under ``workdir``.

    aet: Orthanc's own AE title (the called AE title of our C-FIND/C-MOVE/C-GET).
    modalities: name -> Modality registered in ``DicomModalities`` from the start.
    username/password: the HTTP basic credentials every REST and DICOMweb request needs.
    config: extra top-level configuration keys (e.g. ``{"LimitFindResults": 5}``).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        aet: str = "ORTHANC",
        modalities: dict[str, Modality] | None = None,
        username: str = "cxr-test",
        password: str = "orthanc-test-password",
        config: dict | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.aet = aet
        self.modalities = dict(modalities or {})
        self.username = username
        self.password = password
        self.extra_config = dict(config or {})
        self.http_port = 0
        self.dicom_port = 0
        self._proc: subprocess.Popen | None = None
        self._session = requests.Session()
        self._session.auth = self.auth

    # --- addresses ---------------------------------------------------------------------------

    @property
    def auth(self) -> tuple[str, str]:
        return (self.username, self.password)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- life cycle --------------------------------------------------------------------------

    def config(self) -> dict:
        storage = self.workdir / "storage"
        return {
            "Name": "cxr-screen-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "DicomModalities": {
                name: [m.aet, m.host, m.port] for name, m in self.modalities.items()
            },
            # C-FIND/C-MOVE/C-GET only from registered modalities, as a hospital PACS does.
            "DicomAlwaysAllowFind": False,
            "DicomAlwaysAllowMove": False,
            "DicomAlwaysAllowGet": False,
            "Plugins": [DICOMWEB_PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
            "HttpThreadsCount": 50,
            "DicomThreadsCount": 8,
            "KeepAlive": True,
            "SaveJobs": False,
            "StableAge": 60,
            "OverwriteInstances": True,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpCompressionEnabled": False,
            "SyncStorageArea": False,
            "DicomScuTimeout": 10,
            "DicomScpTimeout": 30,
            **self.extra_config,
        }

    def start(self, timeout: float = 30.0) -> Orthanc:
        """Start Orthanc on free loopback ports and wait until ``/system`` answers."""
        require_orthanc()
        if self._proc is not None:
            raise RuntimeError("this Orthanc is already running")
        self.workdir.mkdir(parents=True, exist_ok=True)
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self.http_port, self.dicom_port = free_port(), free_port()
            config_path = self.workdir / "orthanc.json"
            config_path.write_text(json.dumps(self.config(), indent=2))
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [ORTHANC_BINARY, str(config_path)],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    cwd=self.workdir,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            try:
                self._wait_ready(timeout)
                return self
            except RuntimeError as exc:
                last_error = str(exc)
                self.stop()
        raise RuntimeError(f"Orthanc did not start: {last_error}\n{self.log_tail()}")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert self._proc is not None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self._proc.returncode}")
            try:
                r = self._session.get(f"{self.url}/system", timeout=2)
                if r.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"/system did not answer within {timeout:.0f} s")

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 10 s); storage stays in ``workdir``."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Orthanc stopped (SIGSTOP) for the duration: it accepts connections but never answers."""
        assert self._proc is not None
        self._proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self._proc.send_signal(signal.SIGCONT)

    # --- REST --------------------------------------------------------------------------------

    def rest(self, method: str, path: str, **kwargs) -> requests.Response:
        """One authenticated REST call; raises on an HTTP error with Orthanc's answer."""
        r = self._session.request(method, f"{self.url}{path}", timeout=60, **kwargs)
        if r.status_code >= 400:
            raise RuntimeError(f"Orthanc {method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def upload(self, data: bytes) -> str:
        """Store one DICOM file (its bytes); return Orthanc's instance id."""
        r = self.rest("POST", "/instances", data=data)
        answer = r.json()
        if answer.get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused the instance: {answer}")
        return answer["ID"]

    def upload_files(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        return [self.upload(Path(p).read_bytes()) for p in paths]

    def register_modality(self, name: str, modality: Modality) -> None:
        """Add or replace a DICOM peer at run time (``PUT /modalities/NAME``)."""
        self.rest(
            "PUT",
            f"/modalities/{name}",
            json={"AET": modality.aet, "Host": modality.host, "Port": modality.port},
        )
        self.modalities[name] = modality

    def lookup(self, uid: str) -> list[dict]:
        return self.rest("POST", "/tools/lookup", data=uid).json()

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Delete one instance by its SOP Instance UID."""
        hits = [h for h in self.lookup(sop_instance_uid) if h["Type"] == "Instance"]
        if not hits:
            raise KeyError(f"no instance {sop_instance_uid} in Orthanc")
        self.rest("DELETE", f"/instances/{hits[0]['ID']}")

    def instance_bytes(self, sop_instance_uid: str) -> bytes:
        """The stored file of an instance, as Orthanc keeps it."""
        hits = [h for h in self.lookup(sop_instance_uid) if h["Type"] == "Instance"]
        if not hits:
            raise KeyError(f"no instance {sop_instance_uid} in Orthanc")
        return self.rest("GET", f"/instances/{hits[0]['ID']}/file").content

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for oid in self.rest("GET", "/instances").json():
            tags = self.rest("GET", f"/instances/{oid}/simplified-tags").json()
            uids.add(tags["SOPInstanceUID"])
        return uids

    def count_instances(self) -> int:
        return int(self.rest("GET", "/statistics").json()["CountInstances"])

    def clear(self) -> None:
        """Delete every patient (and so every study and instance)."""
        for pid in self.rest("GET", "/patients").json():
            self.rest("DELETE", f"/patients/{pid}")

    def remove_storage(self) -> None:
        """Delete the work folder (only while stopped)."""
        if self.running:
            raise RuntimeError("stop Orthanc before removing its storage")
        shutil.rmtree(self.workdir, ignore_errors=True)
