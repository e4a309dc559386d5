"""One settings object for the whole tool, read from the environment at call time.

Every field can be set with ``CXR_SCREEN_<FIELD>`` (e.g. ``CXR_SCREEN_DATABASE_URL``) or in a
``.env`` file in the working directory. Lower layers (``tasks/``, ``sql/``, ``model/``) never
read settings themselves: flows and the CLI read them once and pass plain values down.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_SCREEN_", env_file=".env", extra="ignore")

    database_url: str = Field(
        default="sqlite:///cxr_screen.db",
        description="SQLAlchemy URL of the results database (SQLite file or postgresql+psycopg://)",
    )
    home: Path = Field(
        default=Path(".cxr-screen"),
        description="Folder for local state: the HMAC key file, thumbnails, the Prefect home",
    )
    hmac_key: SecretStr | None = Field(
        default=None,
        description="Secret for keyed hashes of patient identifiers; if unset, a random key is "
        "created once in <home>/hmac.key (mode 0600)",
    )
    model_path: Path | None = Field(default=None, description="Default model checkpoint")
    drop_folder: Path | None = Field(default=None, description="Folder the nightly run scans")
    nightly_cron: str = "0 2 * * *"
    timezone: str = "UTC"
    device: str = "auto"
    shard_size: int = 256
    workers: int | None = None
    batch_size: int | None = None
    pixel_path: Literal["auto", "device", "cpu"] = Field(
        default="auto",
        description="Where windowing and resizing run: auto (on the GPU when the model runs on "
        "CUDA), device (the device path, tasks/device; also on a CPU) or cpu (in the decode "
        "workers)",
    )
    stale_run_hours: float | None = Field(
        default=6.0,
        description="A run still 'running' whose last shard commit (heartbeat) is older than "
        "this is marked 'abandoned' when the next run starts (its process died); unset or "
        "0: never marked",
    )
    # Fan-out reprocessing (flows/fanout.py, docker/README.md).
    spool_dir: Path | None = Field(
        default=None,
        description="Where compressed-tar members are written out once for the fan-out's "
        "workers (a folder every worker mounts at the same path); unset: a .tar.gz source is "
        "refused with the reason",
    )
    device_slot: str | None = Field(
        default=None,
        description="This worker's device, named uniquely across the deployment (e.g. "
        "gpu-host-1/gpu0): shards take its Prefect concurrency slot (limit 1), so two shards "
        "never share that device even when two workers are pointed at it by mistake. Unset: "
        "<hostname>/cuda:<CUDA_VISIBLE_DEVICES> on a GPU, no slot on CPU",
    )
    manifest_size: int = Field(
        default=4096, description="Files per fan-out shard manifest (one sub-flow run each)"
    )
    pacs_overlap_days: int = Field(
        default=3,
        ge=0,
        description="The nightly run from a PACS queries study dates from its last successful "
        "night's last date minus this many days (studies arrive late; instances already "
        "predicted are skipped, so the overlap costs queries only)",
    )

    @property
    def stale_run_after(self):
        """``stale_run_hours`` as a timedelta, or None when runs are never marked abandoned."""
        import datetime as dt

        return dt.timedelta(hours=self.stale_run_hours) if self.stale_run_hours else None

    @property
    def thumbnails_dir(self) -> Path:
        return self.home / "thumbnails"

    def hmac_secret(self) -> bytes:
        """The key for patient-identifier hashes; created with mode 0600 on first use."""
        if self.hmac_key is not None:
            return self.hmac_key.get_secret_value().encode()
        path = self.home / "hmac.key"
        if not path.exists():
            self.home.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
        return path.read_text().strip().encode()


def get_settings(**overrides) -> Settings:
    """Settings from the environment now (not at import), with explicit overrides on top."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def pacs_config():
    """The named PACS entries (``tasks.dicom.pacs.config``): ``CXR_SCREEN_PACS_CONFIG`` and the
    ``CXR_SCREEN_PACS__<NAME>__<FIELD>`` variables, from the environment over ``./.env``."""
    from dotenv import dotenv_values

    from tasks.dicom.pacs.config import load_pacs_config

    environ = {k: v for k, v in dotenv_values(".env").items() if v is not None}
    environ.update(os.environ)
    return load_pacs_config(environ)


@contextlib.contextmanager
def environment(**fields: str) -> Iterator[None]:
    """Settings for the flows run in this process during the block, as ``CXR_SCREEN_<FIELD>``
    environment variables (restored after): how a caller hands a flow a setting that must not
    be a flow parameter, such as a database URL with its password."""
    names = {f"CXR_SCREEN_{field.upper()}": value for field, value in fields.items()}
    unknown = [f for f in fields if f not in Settings.model_fields]
    if unknown:
        raise ValueError(
            f"{', '.join(unknown)}: not a setting ({', '.join(Settings.model_fields)})"
        )
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(names)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
