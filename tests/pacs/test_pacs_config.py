"""PACS configuration: file and environment, validation, and secrets that never show."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tasks.dicom.pacs.common import StudyWindow, parse_source_uri, source_uri
from tasks.dicom.pacs.config import (
    PacsConfigError,
    Secret,
    is_pacs_source,
    load_pacs_config,
)

PASSWORD = "s3cret-Pa55word"
TOKEN = "tok-abcdef-123456"


def test_environment_entries_dicomweb_and_dimse():
    config = load_pacs_config(
        {
            "CXR_SCREEN_PACS__MAIN__URL": "https://pacs.example.org/dicom-web/",
            "CXR_SCREEN_PACS__MAIN__USERNAME": "cxr",
            "CXR_SCREEN_PACS__MAIN__PASSWORD": PASSWORD,
            "CXR_SCREEN_PACS__MAIN__CONNECTIONS": "8",
            "CXR_SCREEN_PACS__Archive__URL": "dimse://ARCHIVE@10.1.2.3:104",
            "CXR_SCREEN_PACS__ARCHIVE__MOVE_PORT": "11113",
            "CXR_SCREEN_PACS_AE_TITLE": "CXR1",
            "UNRELATED": "x",
        }
    )
    main = config.get("MAIN")
    assert (main.kind, main.url, main.connections, main.auth_kind) == (
        "dicomweb",
        "https://pacs.example.org/dicom-web",
        8,
        "basic",
    )
    assert main.verify is True and main.password.reveal() == PASSWORD
    archive = config.get("archive")
    assert (archive.kind, archive.aet, archive.host, archive.port, archive.move_port) == (
        "dimse",
        "ARCHIVE",
        "10.1.2.3",
        104,
        11113,
    )
    assert archive.calling_aet == "CXR1" and archive.retrieve == "move"
    assert archive.describe() == "archive (DIMSE ARCHIVE@10.1.2.3:104)"


def test_secrets_never_show(tmp_path):
    config = load_pacs_config(
        {
            "CXR_SCREEN_PACS__A__URL": "https://a/dicom-web",
            "CXR_SCREEN_PACS__A__USERNAME": "u",
            "CXR_SCREEN_PACS__A__PASSWORD": PASSWORD,
            "CXR_SCREEN_PACS__B__URL": "https://b/dicom-web",
            "CXR_SCREEN_PACS__B__TOKEN": TOKEN,
        }
    )
    text = " ".join(
        [repr(config), str(config.entries), *(e.describe() for e in config.entries.values())]
    )
    assert PASSWORD not in text and TOKEN not in text
    assert str(Secret(PASSWORD)) == "********" and PASSWORD not in repr(Secret(PASSWORD))


def test_file_toml_and_environment_override(tmp_path):
    secret_file = tmp_path / "main.pw"
    secret_file.write_text(PASSWORD + "\n")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    path = tmp_path / "pacs.toml"
    path.write_text(
        f"""
ae_title = "CXRFILE"
[pacs.main]
url = "https://pacs.example.org/dicom-web"
username = "cxr"
password_file = "{secret_file}"
ca_bundle = "{ca}"
page_size = 500
[pacs.old]
aet = "OLDPACS"
host = "old.example.org"
port = 11112
retrieve = "get"
"""
    )
    config = load_pacs_config(
        {"CXR_SCREEN_PACS_CONFIG": str(path), "CXR_SCREEN_PACS__MAIN__PAGE_SIZE": "50"}
    )
    main = config.get("main")
    assert main.password.reveal() == PASSWORD and main.verify == str(ca)
    assert main.page_size == 50  # the environment wins field by field
    old = config.get("old")
    assert (old.retrieve, old.calling_aet, old.port) == ("get", "CXRFILE", 11112)
    assert config.source == str(path)


def test_file_json(tmp_path):
    path = tmp_path / "pacs.json"
    path.write_text(json.dumps({"pacs": {"web": {"url": "http://127.0.0.1:8042/dicom-web"}}}))
    assert load_pacs_config({"CXR_SCREEN_PACS_CONFIG": str(path)}).get("web").kind == "dicomweb"


def test_a_readable_file_holding_a_password_is_refused(tmp_path):
    path = tmp_path / "pacs.toml"
    path.write_text(
        f'[pacs.main]\nurl = "https://p/dicom-web"\nusername = "u"\npassword = "{PASSWORD}"\n'
    )
    path.chmod(0o644)
    with pytest.raises(PacsConfigError) as info:
        load_pacs_config({"CXR_SCREEN_PACS_CONFIG": str(path)})
    assert "mode 0644" in str(info.value) and PASSWORD not in str(info.value)
    path.chmod(0o600)
    assert load_pacs_config({"CXR_SCREEN_PACS_CONFIG": str(path)}).get("main").password


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"CXR_SCREEN_PACS__X__URL": f"https://user:{PASSWORD}@p/dicom-web"}, "credentials in"),
        ({"CXR_SCREEN_PACS__X__URL": "ftp://p/x"}, "should start with http:// or https://"),
        ({"CXR_SCREEN_PACS__X__USERNAME": "u"}, "no address"),
        ({"CXR_SCREEN_PACS__X__URL": "dimse://TOO_LONG_AE_TITLE_X@h:104"}, "1 to 16 printable"),
        ({"CXR_SCREEN_PACS__X__URL": "dimse://A@h:99999"}, "between 1 and 65535"),
        (
            {"CXR_SCREEN_PACS__X__URL": "https://p/w", "CXR_SCREEN_PACS__X__PASSWORD": PASSWORD},
            "needs a username",
        ),
        (
            {
                "CXR_SCREEN_PACS__X__URL": "https://p/w",
                "CXR_SCREEN_PACS__X__TOKEN": TOKEN,
                "CXR_SCREEN_PACS__X__USERNAME": "u",
            },
            "either a bearer token or username/password",
        ),
        (
            {"CXR_SCREEN_PACS__X__URL": "https://p/w", "CXR_SCREEN_PACS__X__PORTT": "1"},
            "unknown field(s) portt",
        ),
        (
            {"CXR_SCREEN_PACS__X__URL": "https://p/w", "CXR_SCREEN_PACS__X__CONNECTIONS": "many"},
            "whole number",
        ),
        (
            {"CXR_SCREEN_PACS__X__URL": "https://p/w", "CXR_SCREEN_PACS__X__VERIFY_TLS": "perhaps"},
            "true or false",
        ),
        (
            {
                "CXR_SCREEN_PACS__X__URL": "https://p/w",
                "CXR_SCREEN_PACS__X__CA_BUNDLE": "/nope.pem",
            },
            "ca_bundle",
        ),
        ({"CXR_SCREEN_PACS__X__AET": "A", "CXR_SCREEN_PACS__X__HOST": "h"}, "needs port as well"),
        ({"CXR_SCREEN_PACS__URL": "https://p/w"}, "expected CXR_SCREEN_PACS__<NAME>__<FIELD>"),
    ],
)
def test_bad_entries_name_the_field_and_never_the_secret(env, expected):
    with pytest.raises(PacsConfigError) as info:
        load_pacs_config(env)
    message = str(info.value)
    assert expected in message
    assert PASSWORD not in message and TOKEN not in message and "\n" not in message


def test_resolve_names_and_urls():
    config = load_pacs_config(
        {
            "CXR_SCREEN_PACS__MAIN__URL": "http://127.0.0.1:8042/dicom-web",
            "CXR_SCREEN_PACS__MAIN__USERNAME": "u",
            "CXR_SCREEN_PACS__MAIN__PASSWORD": PASSWORD,
        }
    )
    assert config.resolve("pacs://main").name == "main"
    assert config.resolve("Main").name == "main"
    # A URL of a configured PACS uses its entry (credentials included).
    same = config.resolve("dicomweb+http://127.0.0.1:8042/dicom-web/")
    assert same.name == "main" and same.password is not None
    adhoc = config.resolve("dicomweb+https://other.example.org/dicom-web")
    assert (adhoc.name, adhoc.auth_kind) == ("other.example.org", "none")
    dimse = config.resolve("dimse://PACS@10.0.0.9:104")
    assert (dimse.name, dimse.kind, dimse.calling_aet) == (
        "PACS@10.0.0.9:104",
        "dimse",
        "CXRSCREEN",
    )
    with pytest.raises(
        PacsConfigError, match="no PACS named 'nope' is configured \\(configured: main\\)"
    ):
        config.resolve("nope")
    assert is_pacs_source("dicomweb+http://h/x") and is_pacs_source("pacs://main")
    assert not is_pacs_source("/data/drop") and not is_pacs_source("main")


def test_study_window():
    assert StudyWindow.parse("2026-11-28").dicom() == "20261128"
    window = StudyWindow.parse("2026-11-01..2026-11-28")
    assert window.dicom() == "20261101-20261128" and window.days == 28
    assert StudyWindow.parse("20261101-20261128") == window
    left, right = window.split()
    assert (left.first, left.last, right.first, right.last) == (
        dt.date(2026, 11, 1),
        dt.date(2026, 11, 14),
        dt.date(2026, 11, 15),
        dt.date(2026, 11, 28),
    )
    assert StudyWindow.parse("2026-11-28").split() is None
    assert StudyWindow.since(dt.date(2026, 11, 20), dt.date(2026, 11, 28)).days == 9
    with pytest.raises(ValueError, match="not a date"):
        StudyWindow.parse("yesterday")
    with pytest.raises(ValueError, match="ends"):
        StudyWindow.parse("2026-11-28..2026-11-01")


def test_source_uri_names_the_pacs_and_uids_only():
    from tasks.dicom.pacs.common import InstanceRef

    ref = InstanceRef("1.2.3", "1.2.3.4", "1.2.3.4.5")
    uri = source_uri("dicomweb", "main", ref)
    assert uri == "dicomweb://main/studies/1.2.3/series/1.2.3.4/instances/1.2.3.4.5"
    assert parse_source_uri(uri) == ("dicomweb", "main", ref)
    assert parse_source_uri("/data/x.dcm") is None
