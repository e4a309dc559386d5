"""Who is reviewing: logins against ``web_users`` (argon2 hashes), or a trusted proxy's header.

Sessions are Starlette's signed cookies (HttpOnly, SameSite=Lax, Secure when configured); this
module keeps what goes into them (the user's name, a CSRF token, a session id that logging
out revokes) and checks every POST's CSRF token.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass

import sqlalchemy as sa
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy.engine import Engine

from sql.schema import WebUser

USERNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
PASSWORD_MIN = 8
PASSWORD_MAX = 1024
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"

_hasher = PasswordHasher()  # argon2id, the library's defaults (RFC 9106 low-memory profile)


@functools.cache
def _dummy_hash() -> str:
    """Verified when the name is unknown, so that a wrong name takes as long as a wrong
    password."""
    return _hasher.hash(secrets.token_hex(16))


class UserError(ValueError):
    """A user name or password that cannot be used; the message says why."""


def check_username(name: str) -> str:
    if not USERNAME.fullmatch(name or ""):
        raise UserError(
            "a user name is 1-64 letters, digits or . _ @ - and starts with a letter or digit"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < PASSWORD_MIN:
        raise UserError(f"a password needs at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise UserError(f"a password may have at most {PASSWORD_MAX} characters")
    return password


def hash_password(password: str) -> str:
    return _hasher.hash(check_password(password))


def add_user(engine: Engine, username: str, password: str, *, update: bool = False) -> str:
    """Add a login (or, with ``update``, set an existing one's password and enable it).

    Needs write access to ``web_users`` (the database owner; a reviewer login has none).
    Returns "added" or "updated".
    """
    check_username(username)
    hashed = hash_password(password)
    users = WebUser.__table__
    now = dt.datetime.now(dt.UTC)
    with engine.begin() as conn:
        exists = conn.execute(
            sa.select(users.c.user_id).where(users.c.username == username)
        ).scalar_one_or_none()
        if exists is not None and not update:
            raise UserError(f"user {username!r} exists; use --update to set a new password")
        if exists is None:
            conn.execute(
                users.insert().values(
                    username=username, password_hash=hashed, active=True, updated_at=now
                )
            )
            return "added"
        conn.execute(
            users.update()
            .where(users.c.user_id == exists)
            .values(password_hash=hashed, active=True, updated_at=now)
        )
        return "updated"


def disable_user(engine: Engine, username: str) -> None:
    """Stop a login from signing in; its open sessions end at their next request."""
    users = WebUser.__table__
    with engine.begin() as conn:
        done = conn.execute(
            users.update()
            .where(users.c.username == username)
            .values(active=False, updated_at=dt.datetime.now(dt.UTC))
        ).rowcount
    if not done:
        raise UserError(f"there is no user {username!r}")


def verify_login(engine: Engine, username: str, password: str) -> bool:
    """True when the name is an active user and the password matches its hash."""
    users = WebUser.__table__
    row = None
    if USERNAME.fullmatch(username or "") and len(password) <= PASSWORD_MAX:
        with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
            row = conn.execute(
                sa.select(users.c.password_hash, users.c.active).where(users.c.username == username)
            ).first()
    try:
        _hasher.verify(row.password_hash if row else _dummy_hash(), password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return bool(row and row.active)


def is_active(engine: Engine, username: str) -> bool:
    users = WebUser.__table__
    with engine.connect().execution_options(sqlite_begin="DEFERRED") as conn:
        active = conn.execute(
            sa.select(users.c.active).where(users.c.username == username)
        ).scalar_one_or_none()
    return bool(active)


# -- sessions, CSRF, proxies -------------------------------------------------------------------


def new_token() -> str:
    return secrets.token_urlsafe(32)


def tokens_match(expected: str | None, given: str | None) -> bool:
    if not expected or not given:
        return False
    return secrets.compare_digest(expected.encode(), given.encode())


@dataclass
class ProxyTrust:
    """The proxies whose user header is believed (exact peer addresses or networks)."""

    header: str | None
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]

    @classmethod
    def of(cls, header: str | None, trusted: list[str]) -> ProxyTrust:
        return cls(
            header.lower() if header else None,
            [ipaddress.ip_network(t, strict=False) for t in trusted],
        )

    def user(self, peer: str | None, headers) -> str | None:
        """The user the proxy names, when the request comes straight from a trusted proxy.

        ``peer`` is the TCP peer address (uvicorn runs without proxy-header rewriting, so an
        X-Forwarded-For header cannot pose as a proxy).
        """
        if not self.header or not peer or not self.networks:
            return None
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return None
        if not any(address in net for net in self.networks):
            return None
        name = (headers.get(self.header) or "").strip()
        return name if USERNAME.fullmatch(name) else None


class Revoked:
    """Session ids ended by logging out, kept until they would have expired anyway."""

    def __init__(self, lifetime_s: float) -> None:
        self.lifetime_s = lifetime_s
        self._ids: dict[str, float] = {}
        self._lock = threading.Lock()

    def add(self, sid: str) -> None:
        with self._lock:
            now = time.monotonic()
            self._ids = {k: t for k, t in self._ids.items() if t > now}
            self._ids[sid] = now + self.lifetime_s

    def __contains__(self, sid: object) -> bool:
        with self._lock:
            expiry = self._ids.get(sid)  # type: ignore[arg-type]
            return expiry is not None and expiry > time.monotonic()


class LoginThrottle:
    """After ``limit`` failed logins for one name within ``window_s`` (or ``address_limit``
    from one address: many users may share a proxy or a reading-room workstation), further
    attempts are refused until the window has passed."""

    def __init__(self, limit: int = 5, address_limit: int = 30, window_s: float = 300.0) -> None:
        self.limit = limit
        self.address_limit = address_limit
        self.window_s = window_s
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def _limit(self, key: str) -> int:
        return self.address_limit if key.startswith("addr:") else self.limit

    def _recent(self, key: str, now: float) -> list[float]:
        times = [t for t in self._fails.get(key, []) if now - t < self.window_s]
        self._fails[key] = times
        return times

    def blocked(self, *keys: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(len(self._recent(k, now)) >= self._limit(k) for k in keys)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)

    def succeeded(self, *keys: str) -> None:
        with self._lock:
            for k in keys:
                self._fails.pop(k, None)
