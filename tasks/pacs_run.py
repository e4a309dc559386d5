"""PACS sources in a screening run: which studies to ask for, partial studies, the spool.

A run that names PACS sources (``pacs://NAME``, ``dicomweb+https://...``,
``dimse://AET@host:port``) opens one :class:`~tasks.dicom.pacs.source.PacsRetrieval` per source
before anything is recorded (:func:`open_retrievals`: the study query runs then, so a PACS that
is down or refuses us stops the run with one line and no run row). Its entries go through the
same header scan, selection, pixel path and shard loop as files, with
:class:`PacsShardSteps` in place of ``ShardSteps``:

- a file of a study found *partial* (fewer instances arrived than the PACS announced) keeps its
  prediction, its outcome's reason says the study is partial, and the study is not aggregated
  by that shard (``ShardRows.held_studies``);
- once a shard is stored, its spooled copies are deleted (``PacsRetrieval.release``).

After the run, :func:`record_partials` keeps the partial studies' UIDs per PACS
(``sql.pacs_studies``); the next run from that PACS asks for them again
(:func:`pending_studies`), so a study partial last night is completed, and aggregated once,
tonight. The nightly run's study-date window is :func:`nightly_window`.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from sql import pacs_studies
from sql.db import session_factory
from tasks.dicom.pacs.common import PacsError, StudyWindow
from tasks.dicom.pacs.config import PacsConfig
from tasks.dicom.pacs.source import PacsRetrieval, pacs_sources
from tasks.dicom.selection import SelectionPolicy
from tasks.dicom.sources import InputFile
from tasks.ingest import ScanItem
from tasks.screening import PendingShard, ShardRows
from tasks.shard_loop import ShardSteps


class PacsRunError(ValueError):
    """A PACS source cannot be used for this run (one line, naming the PACS)."""


def study_window(
    study_date: str | None, since: str | None, today: dt.date | None = None
) -> StudyWindow | None:
    """The window of ``--study-date`` (a date or a range) or ``--since`` (a date to today)."""
    if study_date and since:
        raise PacsRunError("give either --study-date or --since, not both")
    try:
        if study_date:
            return StudyWindow.parse(study_date)
        if since:
            first = StudyWindow.parse(since)
            if first.days != 1:
                raise PacsRunError(f"--since {since!r} should be one date (YYYY-MM-DD)")
            return StudyWindow.since(first.first, today or dt.date.today())
    except ValueError as exc:
        if isinstance(exc, PacsRunError):
            raise
        raise PacsRunError(str(exc)) from None
    return None


def nightly_window(last: dt.date | None, overlap_days: int, today: dt.date) -> StudyWindow:
    """Study dates from the last successful night's last date minus ``overlap_days`` (today
    minus the overlap on the first night) to today: studies arrive late, and what was
    predicted already is skipped by UID, so the overlap costs queries only."""
    start = (last or today) - dt.timedelta(days=overlap_days)
    return StudyWindow.since(min(start, today), today)


def pacs_name(spec: str, config: PacsConfig) -> str:
    """The name a source's PACS goes by (the configured entry's, or one made from the URL)."""
    return config.resolve(spec).name


def pending_studies(engine: Engine, pacs: str) -> list[str]:
    """The studies the last runs from ``pacs`` found partial, to ask for again."""
    with session_factory(engine, read_only=True)() as session:
        return pacs_studies.pending_studies(session, pacs)


def open_retrievals(
    specs: Sequence[str],
    config: PacsConfig,
    *,
    window: StudyWindow | None,
    study_uids: Iterable[str] = (),
    pending: dict[str, list[str]] | None = None,
    policy: SelectionPolicy,
    connections: int | None,
    spool_dir: str | os.PathLike[str] | None,
) -> list[PacsRetrieval]:
    """One prepared retrieval per PACS source (its study query has run).

    ``pending``: PACS name -> study UIDs found partial before (asked for by UID as well).
    Raises ``PacsRunError`` (one line) when a source is not configured, has nothing to ask
    for, or its PACS cannot be used (unreachable, credentials refused, a nonsense answer);
    the retrievals opened so far are closed first.
    """
    opened: list[PacsRetrieval] = []
    try:
        for spec in specs:
            name = pacs_name(spec, config)
            uids = [*study_uids, *(pending or {}).get(name, [])]
            if window is None and not uids:
                raise PacsRunError(
                    f"PACS source {spec!r}: give --study-date or --since (which studies to screen)"
                )
            retrieval = pacs_sources(
                spec,
                config,
                window=window,
                study_uids=uids,
                policy=policy,
                connections=connections,
                spool_dir=spool_dir,
            )
            opened.append(retrieval)
            retrieval.prepare()
    except (PacsError, ValueError) as exc:  # PacsConfigError is a ValueError
        for retrieval in opened:
            retrieval.close()
        if isinstance(exc, PacsRunError):
            raise
        raise PacsRunError(" ".join(str(exc).split())) from None
    except BaseException:
        for retrieval in opened:
            retrieval.close()
        raise
    return opened


def mark_partial(rows: ShardRows, retrievals: Sequence[PacsRetrieval]) -> None:
    """Files of a partial study: a predicted file's outcome gets the study's reason, and the
    shard does not aggregate the study (``rows.held_studies``)."""
    for row in rows.outcomes:
        for retrieval in retrievals:
            study = retrieval.completeness_of(row["source_uri"])
            if study is None:
                continue
            if not study.complete:
                rows.held_studies.add(study.study_uid)
                if row.get("study_instance_uid"):
                    rows.held_studies.add(row["study_instance_uid"])
                if row["outcome"] == "predicted" and not row.get("reason"):
                    row["reason"] = study.reason
            break


@dataclass
class PacsShardSteps(ShardSteps):
    """``ShardSteps`` for runs with PACS sources: partial studies marked (:func:`mark_partial`),
    and each shard's spooled files deleted once the shard is stored."""

    retrievals: Sequence[PacsRetrieval] = ()
    _files: dict[int, list[Any]] = field(default_factory=dict, init=False, repr=False)

    def start(self, items: list[ScanItem], skip: set[str]) -> PendingShard:
        pending = super().start(items, skip)
        self._files[id(pending)] = [item.source for item in items]
        return pending

    def score(self, pending: PendingShard) -> ShardRows:
        rows = super().score(pending)
        self._files[id(rows)] = self._files.pop(id(pending), [])
        mark_partial(rows, self.retrievals)
        return rows

    def write(self, rows: ShardRows) -> Any:
        counts = super().write(rows)
        files: list[InputFile] = self._files.pop(id(rows), [])
        for retrieval in self.retrievals:
            retrieval.release(files)
        return counts


def record_partials(
    engine: Engine, retrievals: Sequence[PacsRetrieval], run_id: int
) -> dict[str, list[str]]:
    """Keep each PACS's partial studies for the next run and forget the ones settled (complete
    now, or asked for by UID and no longer found when the run was not cut short). Returns
    PACS name -> partial study UIDs."""
    out: dict[str, list[str]] = {}
    with session_factory(engine).begin() as session:
        for r in retrievals:
            partial = {c.study_uid: c.reason or "study partial" for c in r.partial_studies()}
            settled = {uid for uid, c in r.completeness.items() if c.complete}
            if r.broken is None:
                settled |= set(r.study_uids) - set(r.completeness)
            pacs_studies.record_studies(
                session, r.name, partial=partial, settled=settled, run_id=run_id
            )
            out[r.name] = sorted(partial)
    return out


def retrieval_complete(retrievals: Sequence[PacsRetrieval]) -> bool:
    """Whether every retrieval ran to its end and no query was capped: only then may a
    nightly watermark move."""
    return all(r.broken is None and not r.report.truncated for r in retrievals)
