"""The web page's settings: the tool's settings (``flows.settings``) plus the web-only fields.

Every field is read from the environment (``CXR_SCREEN_<FIELD>``) or ``.env``, like the rest of
the tool's settings: ``CXR_SCREEN_WEB_HOST``, ``CXR_SCREEN_VIEWER_URL_TEMPLATE`` and so on.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from pathlib import Path
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import NoDecode

from flows.settings import Settings

# Where a template may send the browser: web pages only (no javascript:, data:, file:).
_VIEWER_SCHEMES = ("http", "https")
_VIEWER_FIELDS = ("study_uid", "accession")


class WebSettings(Settings):
    web_host: str = Field(
        default="127.0.0.1",
        description="Address the page listens on; loopback unless told otherwise",
    )
    web_port: int = Field(default=8080, ge=1, le=65535)
    web_database_url: str | None = Field(
        default=None,
        description="Database URL the page connects with (e.g. a PostgreSQL login granted "
        "cxr_reviewer: views and reviews only); unset: CXR_SCREEN_DATABASE_URL",
    )
    web_secret_key: SecretStr | None = Field(
        default=None,
        description="Key that signs session cookies; unset: a random key created once in "
        "<home>/web_secret.key (mode 0600)",
    )
    web_session_hours: float = Field(default=12.0, gt=0, description="Session lifetime")
    web_secure_cookies: bool | None = Field(
        default=None,
        description="Mark cookies Secure (HTTPS only). Unset: on when the page serves TLS "
        "itself (web_tls_certfile); set it to true behind a TLS-terminating proxy",
    )
    web_tls_certfile: Path | None = None
    web_tls_keyfile: Path | None = None
    web_proxy_user_header: str | None = Field(
        default=None,
        description="Header carrying the signed-in user's name from a trusted reverse proxy "
        "(e.g. X-Remote-User); honoured only from web_trusted_proxies",
    )
    web_trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Addresses or networks (comma-separated, e.g. 10.0.0.5,10.1.0.0/16) whose "
        "requests may name the user with web_proxy_user_header",
    )
    web_page_size: int = Field(default=50, ge=1, le=500, description="Worklist rows per page")
    viewer_url_template: str | None = Field(
        default=None,
        description="Link to the PACS viewer for a study, e.g. "
        "https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid} ({accession} too)",
    )

    @field_validator("web_trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value):
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"web_trusted_proxies: {item!r} is not an IP address or network"
                ) from None
        return value

    @field_validator("web_proxy_user_header")
    @classmethod
    def _header_name(cls, value):
        if value is not None and not re.fullmatch(r"[A-Za-z0-9-]{1,64}", value):
            raise ValueError(f"web_proxy_user_header {value!r} is not an HTTP header name")
        return value

    @field_validator("viewer_url_template")
    @classmethod
    def _viewer_template(cls, value):
        if not value:
            return None
        scheme = urlsplit(value).scheme.lower()
        if scheme not in _VIEWER_SCHEMES:
            raise ValueError(
                f"viewer_url_template must be an http(s) URL; {value!r} has scheme {scheme!r}"
            )
        fields = set(re.findall(r"{([^{}]*)}", value))
        unknown = fields - set(_VIEWER_FIELDS)
        if unknown:
            raise ValueError(
                f"viewer_url_template names {sorted(unknown)}; only {{study_uid}} and "
                "{accession} are filled in"
            )
        return value

    @property
    def web_db_url(self) -> str:
        return self.web_database_url or self.database_url

    @property
    def secure_cookies(self) -> bool:
        if self.web_secure_cookies is not None:
            return self.web_secure_cookies
        return self.web_tls_certfile is not None

    def session_secret(self) -> str:
        """The cookie-signing key; created with mode 0600 on first use."""
        if self.web_secret_key is not None:
            return self.web_secret_key.get_secret_value()
        path = self.home / "web_secret.key"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process made it first
                return path.read_text().strip()
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip()


def get_web_settings(**overrides) -> WebSettings:
    """Web settings from the environment now, with explicit overrides on top."""
    return WebSettings(**{k: v for k, v in overrides.items() if v is not None})
