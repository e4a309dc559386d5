"""Named PACS entries: where a PACS is, how to log in, how far to trust its certificate.

An imaging-informatics engineer configures each PACS once, by name, and then refers to it by
that name (``cxr-screen pacs echo main``, ``cxr-screen screen pacs://main --study-date ...``).
Entries come from a file and/or the environment; the environment wins field by field, so the
file can live in version control while secrets are injected at run time.

The file (``CXR_SCREEN_PACS_CONFIG``; TOML, or JSON when the name ends in ``.json``)::

    ae_title = "CXRSCREEN"                  # our AE title, for every DIMSE entry (default)

    [pacs.main]                             # DICOMweb
    url = "https://pacs.example.org/dicom-web"
    username = "cxr-screen"
    password_file = "/run/secrets/pacs_main"  # or token / token_file (bearer)
    ca_bundle = "/etc/ssl/certs/hospital-ca.pem"

    [pacs.archive]                          # DIMSE
    url = "dimse://ARCHIVE@10.1.2.3:104"    # or aet / host / port
    retrieve = "move"                       # C-MOVE (default) or "get" (C-GET)
    move_port = 11113                       # where our short-lived C-STORE SCP listens

The environment: ``CXR_SCREEN_PACS__<NAME>__<FIELD>`` (``CXR_SCREEN_PACS__MAIN__URL``,
``CXR_SCREEN_PACS__MAIN__PASSWORD``...) and ``CXR_SCREEN_PACS_AE_TITLE``. Names are
case-insensitive (stored lower-case).

Fields (all optional except the address):
    url: ``http(s)://...`` (DICOMweb base, QIDO/WADO/STOW below it) or ``dimse://AET@host:port``.
    aet, host, port: the DIMSE peer, instead of a ``dimse://`` URL.
    calling_aet: our AE title towards this PACS (default: the top-level ``ae_title``).
    retrieve: ``move`` or ``get`` (DIMSE). move_port: the port of our C-STORE SCP for C-MOVE
        (the PACS must know ``calling_aet`` at this host and port); move_bind: its address.
    username + password / password_file: HTTP basic; token / token_file: HTTP bearer.
    verify_tls (default true), ca_bundle: certificate checks for https (and DIMSE over TLS).
    tls: DIMSE over TLS. connections: parallel connections/associations (default 4).
    timeout: seconds per request / DIMSE message (default 60). retries: after the first
    attempt (default 4). page_size: QIDO ``limit`` (default 100). query_cap: the most
    results this PACS returns for one query (known caps trigger date-window splitting).

Secrets never leave this module in clear: ``Secret`` prints as ``********``, ``PacsEntry``'s
repr and ``describe()`` leave them out, URLs with credentials in them are refused (they would
show in process lists, Prefect parameters and logs), error messages never quote a secret's
value, and a config file holding a password or token must not be readable by other users.
"""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

ENV_PREFIX = "CXR_SCREEN_PACS__"
ENV_CONFIG_FILE = "CXR_SCREEN_PACS_CONFIG"
ENV_AE_TITLE = "CXR_SCREEN_PACS_AE_TITLE"
DEFAULT_AE_TITLE = "CXRSCREEN"
PACS_SCHEMES = ("pacs://", "dicomweb+http://", "dicomweb+https://", "dimse://")

Kind = Literal["dicomweb", "dimse"]
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_SECRET_FIELDS = ("password", "token")


class PacsConfigError(ValueError):
    """A PACS entry that cannot be used; the text names the entry, the field and the rule."""


class Secret:
    """A credential: never shown by ``str``/``repr``; ``reveal()`` where it is sent."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class PacsEntry:
    """One PACS, resolved and validated. ``kind`` follows from the address."""

    name: str
    kind: Kind
    url: str | None = None  # DICOMweb base URL, without a trailing slash
    aet: str | None = None  # DIMSE: the PACS's (called) AE title
    host: str | None = None
    port: int | None = None
    calling_aet: str = DEFAULT_AE_TITLE
    retrieve: Literal["move", "get"] = "move"
    move_port: int | None = None
    move_bind: str = "0.0.0.0"
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    token: Secret | None = field(default=None, repr=False)
    verify_tls: bool = True
    ca_bundle: str | None = None
    tls: bool = False
    connections: int = 4
    timeout: float = 60.0
    retries: int = 4
    page_size: int = 100
    query_cap: int | None = None

    def describe(self) -> str:
        """``main (DICOMweb https://pacs/dicom-web)`` — safe for logs and messages."""
        if self.kind == "dicomweb":
            return f"{self.name} (DICOMweb {self.url})"
        return f"{self.name} (DIMSE {self.aet}@{self.host}:{self.port})"

    @property
    def auth_kind(self) -> str:
        if self.token is not None:
            return "bearer"
        if self.username is not None:
            return "basic"
        return "none"

    @property
    def verify(self) -> bool | str:
        """What ``requests`` takes as ``verify``: False, True, or the CA bundle's path."""
        if not self.verify_tls:
            return False
        return self.ca_bundle or True


@dataclass(frozen=True)
class PacsConfig:
    """Every configured PACS by name, and our default AE title."""

    entries: dict[str, PacsEntry]
    ae_title: str = DEFAULT_AE_TITLE
    source: str = "environment"  # where it was read from, for messages

    def get(self, name: str) -> PacsEntry:
        key = name.strip().lower()
        if key not in self.entries:
            known = ", ".join(sorted(self.entries)) or "none"
            raise PacsConfigError(
                f"no PACS named {name!r} is configured (configured: {known}); add it to the file "
                f"named by {ENV_CONFIG_FILE} or set {ENV_PREFIX}{key.upper()}__URL"
            )
        return self.entries[key]

    def resolve(self, spec: str) -> PacsEntry:
        """The entry for ``NAME``, ``pacs://NAME``, ``dicomweb+http(s)://...`` or ``dimse://...``.

        A URL that matches a configured entry's address uses that entry (its credentials and TLS
        settings); any other URL gives an anonymous entry named after its host.
        """
        spec = spec.strip()
        if spec.startswith("pacs://"):
            return self.get(spec[len("pacs://") :].strip("/"))
        if not spec.startswith(PACS_SCHEMES):
            return self.get(spec)
        if spec.startswith("dicomweb+"):
            url = _check_http_url(spec[len("dicomweb+") :], "the source")
            for entry in self.entries.values():
                if entry.kind == "dicomweb" and entry.url == url:
                    return entry
            parts = urlsplit(url)
            return PacsEntry(name=parts.netloc, kind="dicomweb", url=url, calling_aet=self.ae_title)
        aet, host, port = parse_dimse_url(spec, "the source")
        for entry in self.entries.values():
            if entry.kind == "dimse" and (entry.aet, entry.host, entry.port) == (aet, host, port):
                return entry
        return PacsEntry(
            name=f"{aet}@{host}:{port}",
            kind="dimse",
            aet=aet,
            host=host,
            port=port,
            calling_aet=self.ae_title,
        )


def is_pacs_source(spec: str) -> bool:
    """Whether a source argument names a PACS rather than a folder, file or archive."""
    return str(spec).strip().startswith(PACS_SCHEMES)


def load_pacs_config(environ: Mapping[str, str]) -> PacsConfig:
    """Entries from the file named by ``CXR_SCREEN_PACS_CONFIG`` (if any), then the environment.

    ``environ`` is passed in (the CLI gives ``os.environ`` merged with ``.env``): nothing here
    reads global state.
    """
    raw: dict[str, dict[str, Any]] = {}
    ae_title = DEFAULT_AE_TITLE
    source = "environment"
    config_file = environ.get(ENV_CONFIG_FILE, "").strip()
    if config_file:
        document = _read_file(Path(config_file))
        source = config_file
        if "ae_title" in document:
            ae_title = _aet(document["ae_title"], "ae_title", config_file)
        unknown = sorted(set(document) - {"ae_title", "pacs"})
        if unknown:
            raise PacsConfigError(
                f"{config_file}: unknown top-level key(s) {', '.join(unknown)} "
                "(expected ae_title and [pacs.NAME] tables)"
            )
        tables = document.get("pacs", {})
        if not isinstance(tables, dict):
            raise PacsConfigError(f"{config_file}: 'pacs' should be a table of named entries")
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise PacsConfigError(f"{config_file}: pacs.{name} should be a table of fields")
            raw[_name(name, config_file)] = dict(table)
    if environ.get(ENV_AE_TITLE, "").strip():
        ae_title = _aet(environ[ENV_AE_TITLE], ENV_AE_TITLE, "the environment")
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        rest = key[len(ENV_PREFIX) :]
        if "__" not in rest:
            raise PacsConfigError(
                f"{key}: expected {ENV_PREFIX}<NAME>__<FIELD>, e.g. {ENV_PREFIX}MAIN__URL"
            )
        name, field_name = rest.split("__", 1)
        raw.setdefault(_name(name, key), {})[field_name.lower()] = value
    entries = {name: build_entry(name, values, ae_title, source) for name, values in raw.items()}
    return PacsConfig(entries=entries, ae_title=ae_title, source=source)


# --- building one entry ---------------------------------------------------------------------

_FIELDS = {f.name for f in fields(PacsEntry)} - {"name", "kind"}
_EXTRA_FIELDS = {"password_file", "token_file"}


def build_entry(name: str, values: Mapping[str, Any], ae_title: str, source: str) -> PacsEntry:
    """Validate one entry's raw fields (strings from the environment, typed values from a file)."""
    where = f"PACS {name!r}"
    unknown = sorted(set(values) - _FIELDS - _EXTRA_FIELDS)
    if unknown:
        raise PacsConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)} (known: "
            f"{', '.join(sorted(_FIELDS | _EXTRA_FIELDS))})"
        )
    v = dict(values)
    url = _text(v.pop("url", None))
    aet = _text(v.pop("aet", None))
    host = _text(v.pop("host", None))
    port = _int(v.pop("port", None), f"{where}: port", 1, 65535)
    if url and (aet or host or port):
        raise PacsConfigError(f"{where}: give either url or aet/host/port, not both")
    if url and url.startswith("dimse://"):
        aet, host, port = parse_dimse_url(url, where)
        url = None
    if url:
        kind: Kind = "dicomweb"
        url = _check_http_url(url, where)
    elif aet or host or port:
        kind = "dimse"
        missing = [n for n, x in (("aet", aet), ("host", host), ("port", port)) if not x]
        if missing:
            raise PacsConfigError(f"{where}: a DIMSE peer needs {', '.join(missing)} as well")
        aet = _aet(aet, f"{where}: aet", source)
    else:
        raise PacsConfigError(
            f"{where}: no address; set url (https://host/dicom-web or dimse://AET@host:port) "
            f"or aet, host and port (e.g. {ENV_PREFIX}{name.upper()}__URL)"
        )
    password = _secret(v, "password", where, source)
    token = _secret(v, "token", where, source)
    username = _text(v.pop("username", None))
    if token is not None and (username or password):
        raise PacsConfigError(f"{where}: give either a bearer token or username/password, not both")
    if password is not None and not username:
        raise PacsConfigError(f"{where}: a password needs a username")
    if kind == "dimse" and (token is not None or username):
        raise PacsConfigError(f"{where}: DIMSE has no HTTP credentials; remove username/token")
    retrieve = (_text(v.pop("retrieve", None)) or "move").lower()
    if retrieve not in ("move", "get"):
        raise PacsConfigError(f"{where}: retrieve should be 'move' or 'get', not {retrieve!r}")
    ca_bundle = _text(v.pop("ca_bundle", None))
    if ca_bundle and not os.path.isfile(ca_bundle):
        raise PacsConfigError(f"{where}: ca_bundle {ca_bundle!r} is not a readable file")
    entry = PacsEntry(
        name=name,
        kind=kind,
        url=url,
        aet=aet,
        host=host,
        port=port,
        calling_aet=_aet(v.pop("calling_aet", None) or ae_title, f"{where}: calling_aet", source),
        retrieve=retrieve,  # type: ignore[arg-type]
        move_port=_int(v.pop("move_port", None), f"{where}: move_port", 1, 65535),
        move_bind=_text(v.pop("move_bind", None)) or "0.0.0.0",
        username=username,
        password=password,
        token=token,
        verify_tls=_bool(v.pop("verify_tls", None), f"{where}: verify_tls", True),
        ca_bundle=ca_bundle,
        tls=_bool(v.pop("tls", None), f"{where}: tls", False),
        connections=_int(v.pop("connections", None), f"{where}: connections", 1, 64) or 4,
        timeout=_float(v.pop("timeout", None), f"{where}: timeout", 0.1, 3600) or 60.0,
        retries=_int(v.pop("retries", None), f"{where}: retries", 0, 20, default=4),
        page_size=_int(v.pop("page_size", None), f"{where}: page_size", 1, 100_000) or 100,
        query_cap=_int(v.pop("query_cap", None), f"{where}: query_cap", 1, 10_000_000),
    )
    return entry


def with_overrides(entry: PacsEntry, **changes: Any) -> PacsEntry:
    """A copy with some fields changed (tests, CLI options such as --connections)."""
    return replace(entry, **{k: v for k, v in changes.items() if v is not None})


def parse_dimse_url(url: str, where: str) -> tuple[str, str, int]:
    """``dimse://AET@host:port`` -> (AET, host, port)."""
    m = re.fullmatch(r"dimse://([^@/]+)@(\[[^\]]+\]|[^:/]+):(\d+)/?", url.strip())
    if not m:
        raise PacsConfigError(
            f"{where}: {url!r} is not a DIMSE address; expected dimse://AET@host:port"
        )
    aet = _aet(m.group(1), f"{where}: AE title", "")
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise PacsConfigError(f"{where}: port {port} is not between 1 and 65535")
    return aet, m.group(2).strip("[]"), port


def _check_http_url(url: str, where: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PacsConfigError(
            f"{where}: the DICOMweb URL should start with http:// or https:// and name a host"
        )
    if parts.username is not None or parts.password is not None:
        # The URL itself is not quoted: it holds the credential.
        raise PacsConfigError(
            f"{where}: credentials in the URL are not accepted (they would show in process "
            "lists and logs); set username and password (or token) for a named PACS instead"
        )
    if parts.query or parts.fragment:
        raise PacsConfigError(f"{where}: the DICOMweb base URL should have no ?query or #fragment")
    return url.strip().rstrip("/")


# --- field parsers (messages name the field, never a secret's value) -------------------------


def _name(name: str, where: str) -> str:
    key = str(name).strip().lower()
    if not _NAME.match(key):
        raise PacsConfigError(
            f"{where}: PACS name {name!r} should be letters, digits, '_', '-' or '.' "
            "(at most 64, starting with a letter or digit)"
        )
    return key


def _aet(value: Any, what: str, where: str) -> str:
    text = str(value).strip()
    if not text or len(text) > 16 or "\\" in text or any(ord(c) < 32 or ord(c) > 126 for c in text):
        raise PacsConfigError(
            f"{what}: AE title {text!r} should be 1 to 16 printable ASCII characters without "
            "a backslash" + (f" ({where})" if where else "")
        )
    return text


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(value: Any, what: str, lo: int, hi: int, default: int | None = None) -> int | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return default
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise PacsConfigError(f"{what} should be a whole number, not {value!r}") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise PacsConfigError(f"{what} should be between {lo} and {hi}, not {value!r}")
    return number


def _float(value: Any, what: str, lo: float, hi: float) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PacsConfigError(f"{what} should be a number of seconds, not {value!r}") from None
    if not lo <= number <= hi:
        raise PacsConfigError(f"{what} should be between {lo} and {hi}, not {value!r}")
    return number


def _bool(value: Any, what: str, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise PacsConfigError(f"{what} should be true or false, not {value!r}")


def _secret(values: dict[str, Any], name: str, where: str, source: str) -> Secret | None:
    direct = values.pop(name, None)
    path = _text(values.pop(f"{name}_file", None))
    if direct is not None and path:
        raise PacsConfigError(f"{where}: give {name} or {name}_file, not both")
    if path:
        try:
            text = Path(path).read_text().strip()
        except OSError as exc:
            raise PacsConfigError(
                f"{where}: {name}_file {path!r} cannot be read ({exc.strerror or exc})"
            ) from None
        if not text:
            raise PacsConfigError(f"{where}: {name}_file {path!r} is empty")
        return Secret(text)
    if direct is None:
        return None
    if not isinstance(direct, str) or not direct.strip():
        raise PacsConfigError(f"{where}: {name} should be a non-empty string")  # value not shown
    return Secret(direct.strip())


def _read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise PacsConfigError(
            f"{ENV_CONFIG_FILE}={str(path)!r} cannot be read ({exc.strerror or exc})"
        ) from None
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        # The parser's message names the line; it can quote a line, so not the text itself.
        line = getattr(exc, "lineno", None)
        raise PacsConfigError(
            f"{path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'TOML'}"
            + (f" (line {line})" if line else "")
        ) from None
    if not isinstance(document, dict):
        raise PacsConfigError(f"{path}: expected a table/object at the top level")
    holds_secret = any(
        isinstance(t, dict) and any(k in t for k in _SECRET_FIELDS)
        for t in (document.get("pacs") or {}).values()
    )
    if holds_secret and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PacsConfigError(
            f"{path} holds a password or token but other users can read it (mode "
            f"{stat.S_IMODE(mode):04o}); chmod 600 it, or use password_file / token_file or "
            f"{ENV_PREFIX}<NAME>__PASSWORD"
        )
    return document
