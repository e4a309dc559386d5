"""Fixtures for the PACS tests: a real Orthanc (Debian's) on loopback, with the DICOMweb plugin,
HTTP basic authentication, and our C-STORE SCP registered as a C-MOVE destination.

- ``orthanc``: one Orthanc for the whole session (started once, ~0.2 s; stopped at the end).
- ``pacs``: the same Orthanc, emptied before the test (every study deleted): use this one.
- ``move_port``: the port our C-MOVE destination (AE title ``CXRSCREEN``) must listen on;
  Orthanc knows it as modality ``cxrscreen``. Other SCPs (e.g. the ``listen`` receiver) can be
  added with ``orthanc.register_modality(name, Modality(aet, "127.0.0.1", port))``.

Orthanc missing is an error with the way to install it, never a skip.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from orthanc import Modality, Orthanc, free_port

OUR_AET = "CXRSCREEN"


@pytest.fixture(scope="session")
def move_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory, move_port) -> Iterator[Orthanc]:
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        modalities={"cxrscreen": Modality(OUR_AET, "127.0.0.1", move_port)},
    )
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()


@pytest.fixture
def pacs(orthanc) -> Orthanc:
    """The session's Orthanc with no studies in it."""
    if not orthanc.running:
        pytest.fail(f"Orthanc stopped during the session:\n{orthanc.log_tail()}", pytrace=False)
    orthanc.clear()
    return orthanc
