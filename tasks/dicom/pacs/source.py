"""Query/retrieve as a source of the pipeline (``tasks.dicom.sources.Source``).

``pacs_sources(spec, config, window=...)`` returns a :class:`PacsRetrieval`, a ``Source``:
``prepare()`` runs the study query (and raises ``PacsError`` with one line when the PACS is
unreachable, refuses us or answers nonsense: nothing has been written yet, the run stops), then
``files()`` yields the retrieved instances as input files (the header scan, selection and pixel
path take them unchanged) and ``completeness[study_uid]`` says per study whether everything the
PACS announced arrived.

How a run goes:

1. **Studies**: one query per modality (CR, then DX: matching on the multi-valued
   ModalitiesInStudy is optional in the standard), merged by Study Instance UID. A page that is
   full (as many matches as the limit, the PACS's known cap, or a ``Warning`` header) means
   there may be more than the page shows: the date window is halved and each half queried
   again, down to single days; within a day, DICOMweb asks for a page ten times larger and then
   pages with ``offset``, and a page that brings nothing new (a server that ignores ``offset``)
   ends the paging with the day recorded in ``report.truncated``, never an endless loop. The
   study list (UIDs, dates, counts: ~200 bytes a study) is the one thing held for the run.
2. **Series** of each study, kept when their Modality is wanted and their BodyPartExamined
   (when present) matches the policy's body parts; **instances** listed per kept series.
3. **Retrieval** by ``connections`` workers (HTTP connections or DIMSE associations), with
   retries and backoff inside the client; an instance that still fails becomes an errored
   entry (``ErroredFile``) whose reason names the PACS and the UID: a *failed* outcome.
4. A study's files are yielded together, once all of them have arrived or failed, after its
   :class:`StudyCompleteness` is final: ``completeness[study_uid]`` says whether the study is
   complete by count, and if not, why (the flow records the study as partial and pulls it again
   next run).

``files()`` follows the seam's contract: it never raises for one instance, and when the PACS
is lost part-way (unreachable, credentials refused) it yields the files retrieved so far, then
one errored entry named after the source (``dicomweb://main``), and stops; ``broken`` then
holds the reason (a flow should not move its watermark past such a run).

The bytes are fetched here, not in the decode workers (the seam allows an entry to carry its
bytes "when fetching them again is impossible"): a C-MOVE can only be received by the one SCP
the PACS knows, the header scan needs the bytes before the workers do (a worker fetching again
would download every instance twice), and completeness is known when the study is yielded.
They travel inline in the ``SourceFile`` (``container="inline"``), or, with ``spool_dir``, in
a private folder (mode 0700, files 0600) from which ``release()`` deletes them once the flow has
stored their shard; ``close()`` removes the folder and whatever is left in it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tasks.dicom.discovery import SourceFile
from tasks.dicom.pacs.common import (
    EchoResult,
    InstanceFailure,
    InstanceRef,
    PacsAuthError,
    PacsError,
    PacsUnreachable,
    SeriesCount,
    SeriesMatch,
    StudyCompleteness,
    StudyMatch,
    StudyWindow,
    body_part_wanted,
    parse_source_uri,
    source_uri,
)
from tasks.dicom.pacs.config import PacsConfig, PacsEntry
from tasks.dicom.selection import SelectionPolicy
from tasks.dicom.sources import ErroredFile, InputFile

log = logging.getLogger(__name__)

DEFAULT_MODALITIES = SelectionPolicy().modalities  # CR, DX
DEFAULT_BODY_PARTS = SelectionPolicy().body_parts  # CHEST and its translations


class PacsClient(Protocol):
    """What a DICOMweb or DIMSE client offers the retrieval run."""

    scheme: str
    name: str
    entry: PacsEntry
    supports_offset: bool

    def echo(self) -> EchoResult: ...

    def study_page(
        self,
        window: StudyWindow | None,
        modality: str | None,
        offset: int,
        study_uid: str = "",
        limit: int | None = None,
    ) -> tuple[list[StudyMatch], bool]: ...

    def find_series(self, study_uid: str) -> list[SeriesMatch]: ...

    def find_instances(self, series: SeriesMatch) -> list[InstanceRef]: ...

    def work_units(
        self, series: SeriesMatch, refs: list[InstanceRef]
    ) -> list[list[InstanceRef]]: ...

    def retrieve(
        self, unit: list[InstanceRef]
    ) -> Iterable[tuple[InstanceRef, bytes | InstanceFailure]]: ...

    def close(self) -> None: ...


def make_client(entry: PacsEntry) -> PacsClient:
    if entry.kind == "dicomweb":
        from tasks.dicom.pacs.dicomweb import DicomWebClient

        return DicomWebClient(entry)
    from tasks.dicom.pacs.dimse import DimseClient

    return DimseClient(entry)


def echo(entry: PacsEntry) -> EchoResult:
    """C-ECHO (DIMSE) or a QIDO-RS ping (DICOMweb); ``PacsError`` with one line on failure."""
    client = make_client(entry)
    try:
        return client.echo()
    finally:
        client.close()


# --- the study query ---------------------------------------------------------------------------


@dataclass
class RetrievalReport:
    """Counts of one retrieval run (no UIDs beyond the truncated windows, no patient data)."""

    pacs: str
    studies: int = 0
    studies_complete: int = 0
    studies_partial: int = 0
    series_selected: int = 0
    series_filtered: int = 0
    instances_listed: int = 0
    instances_retrieved: int = 0
    instances_failed: int = 0
    bytes_retrieved: int = 0
    queries: int = 0
    truncated: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> str:
        text = (
            f"PACS {self.pacs!r}: {self.studies} studies ({self.studies_partial} partial), "
            f"{self.series_selected} series selected, {self.series_filtered} filtered, "
            f"{self.instances_retrieved}/{self.instances_listed} instances retrieved "
            f"({self.instances_failed} failed), {self.bytes_retrieved / 1e6:.1f} MB "
            f"in {self.seconds:.1f} s"
        )
        if self.truncated:
            text += f"; query capped for {', '.join(self.truncated)}"
        return text


def find_studies(
    client: PacsClient,
    window: StudyWindow | None,
    modalities: Iterable[str],
    report: RetrievalReport | None = None,
) -> list[StudyMatch]:
    """Studies with any of ``modalities`` in ``window``: one query per modality, merged by UID
    (first seen order), with the window split wherever a page was full."""
    report = report if report is not None else RetrievalReport(client.name)
    merged: dict[str, StudyMatch] = {}
    for modality in modalities:
        for match in _collect(client, window, modality, report):
            if match.study_uid in merged:
                old = merged[match.study_uid]
                mods = tuple(dict.fromkeys((*old.modalities, *match.modalities)))
                merged[match.study_uid] = StudyMatch(
                    old.study_uid, old.study_date, mods, old.announced or match.announced
                )
            else:
                merged[match.study_uid] = match
    return list(merged.values())


def _collect(
    client: PacsClient, window: StudyWindow | None, modality: str, report: RetrievalReport
) -> list[StudyMatch]:
    report.queries += 1
    page, full = client.study_page(window, modality, 0)
    if not full:
        return page
    halves = window.split() if window is not None else None
    if halves is not None:
        return _collect(client, halves[0], modality, report) + _collect(
            client, halves[1], modality, report
        )
    # One day (or no window) and still full: a page ten times larger first (Orthanc 1.10's
    # DICOMweb plugin answers an empty page to any offset > 0 when ModalitiesInStudy is a
    # filter), then pages with offset where the server supports it.
    seen = {m.study_uid: m for m in page}
    empty_after_full = False
    if client.supports_offset:
        limit = client.entry.page_size * 10
        offset = 0
        while full:
            report.queries += 1
            page, full = client.study_page(window, modality, offset, limit=limit)
            new = [m for m in page if m.study_uid not in seen]
            if not page and offset:
                empty_after_full = True
            if not new and offset:
                break  # nothing new: the server ignores offset
            seen.update((m.study_uid, m) for m in new)
            offset += len(page)
    if full or empty_after_full:
        where = f"{window or 'all dates'} ({modality}: {len(seen)} studies received)"
        report.truncated.append(where)
        log.warning(
            "PACS %r %s the study query for %s; more studies may exist",
            client.name,
            "capped" if full else "answered an empty page after a full one to",
            where,
        )
    return list(seen.values())


# --- the retrieval run -------------------------------------------------------------------------


@dataclass
class _Study:
    completeness: StudyCompleteness
    pending: int = 0
    listed: bool = False
    files: list[InputFile] = field(default_factory=list)


class PacsRetrieval:
    """One query/retrieve run against one PACS, as a ``Source``: ``prepare()``, then
    ``files()`` (once).

    window / study_uids: which studies (a study-date window, and/or explicit Study Instance
        UIDs, e.g. the studies that were partial last run).
    modalities: one study query each; series of other modalities are not retrieved.
    body_parts: series whose BodyPartExamined is present and names none of these are not
        retrieved (None: no body-part filter).
    connections: parallel HTTP connections or DIMSE associations (default: the entry's).
    spool_dir: where a private spool folder is made; None keeps the bytes in memory.
    """

    def __init__(
        self,
        client: PacsClient,
        *,
        window: StudyWindow | None = None,
        study_uids: Iterable[str] = (),
        modalities: Iterable[str] = DEFAULT_MODALITIES,
        body_parts: Iterable[str] | None = DEFAULT_BODY_PARTS,
        connections: int | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        max_consecutive_failures: int | None = None,
    ) -> None:
        self.client = client
        self.name = client.name
        self.window = window
        self.study_uids = tuple(dict.fromkeys(study_uids))
        if window is None and not self.study_uids:
            raise ValueError("give a study-date window or study UIDs to retrieve")
        self.modalities = tuple(m.strip().upper() for m in modalities)
        self.body_parts = tuple(body_parts) if body_parts is not None else None
        self.connections = connections or client.entry.connections
        if self.connections < 1:
            raise ValueError(f"connections should be at least 1 instead of {self.connections}")
        self.max_consecutive_failures = max_consecutive_failures or max(8, 2 * self.connections)
        self.completeness: dict[str, StudyCompleteness] = {}
        self.report = RetrievalReport(self.name)
        self.broken: str | None = None  # why the run stopped part-way, if it did
        self._studies: list[StudyMatch] | None = None
        self._spool: Path | None = None
        if spool_dir is not None:
            Path(spool_dir).mkdir(parents=True, exist_ok=True)
            self._spool = Path(tempfile.mkdtemp(prefix="cxr-pacs-", dir=spool_dir))
            os.chmod(self._spool, 0o700)
        self._started = False
        self._consecutive = 0

    # --- public ------------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        """Names the source: ``dicomweb://main`` or ``dimse://archive``."""
        return f"{self.client.scheme}://{self.name}"

    def prepare(self) -> list[StudyMatch]:
        """Run the study query now; ``PacsError`` (one line) when the PACS cannot be used.

        Call it before anything is written: a PACS that is down or refuses us then stops the
        run with that line instead of recording one failed entry."""
        if self._studies is None:
            self._studies = self._query_studies()
            self.report.studies = len(self._studies)
            log.info("PACS %r: %d studies to retrieve", self.name, len(self._studies))
        return self._studies

    def _query_studies(self) -> list[StudyMatch]:
        found = []
        if self.window is not None:
            found = find_studies(self.client, self.window, self.modalities, self.report)
        known = {s.study_uid for s in found}
        for uid in self.study_uids:
            if uid in known:
                continue
            self.report.queries += 1
            page, _ = self.client.study_page(None, None, 0, study_uid=uid)
            found += [m for m in page if m.study_uid == uid][:1]
            known.add(uid)
        return found

    def partial_studies(self) -> list[StudyCompleteness]:
        return [c for c in self.completeness.values() if not c.complete]

    def completeness_of(self, uri: str) -> StudyCompleteness | None:
        """The completeness of the study an entry of this run belongs to (final by the time
        the entry is yielded); None for a URI that is not one of this PACS's instances."""
        parsed = parse_source_uri(uri)
        if parsed is None or parsed[1] != self.name:
            return None
        return self.completeness.get(parsed[2].study_uid)

    def files(self) -> Iterator[InputFile]:
        """The retrieved instances, study by study; never raises a ``PacsError``: a PACS lost
        part-way ends the listing with one errored entry naming the source."""
        if self._started:
            raise RuntimeError("a PacsRetrieval is iterated once")
        self._started = True
        started = time.perf_counter()
        try:
            yield from self._run()
        except PacsError as exc:
            self.broken = str(exc)
            log.warning("PACS %r: retrieval stopped: %s", self.name, exc)
            yield ErroredFile(self.uri, str(exc))
        finally:
            self.report.seconds = time.perf_counter() - started
            self.report.studies_partial = len(self.partial_studies())
            self.report.studies_complete = len(self.completeness) - self.report.studies_partial

    def __iter__(self) -> Iterator[InputFile]:
        return self.files()

    def release(self, files: Iterable[InputFile]) -> None:
        """Delete the spooled copies of ``files`` (their shard is stored)."""
        if self._spool is None:
            return
        for src in files:
            path = getattr(src, "path", "")
            if isinstance(src, SourceFile) and path and Path(path).parent == self._spool:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)

    def close(self) -> None:
        """Remove the spool folder and close the PACS connections."""
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        self.client.close()

    def __enter__(self) -> PacsRetrieval:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- the run -----------------------------------------------------------------------------

    def _run(self) -> Iterator[InputFile]:
        """Listings and retrievals share ``connections`` worker threads; queued retrievals go
        before the next study's listing, so studies finish (and memory is freed) in turn."""
        studies = iter(self.prepare())
        max_inflight = 2 * self.connections
        inflight: dict[cf.Future, tuple[str, str]] = {}  # future -> (kind, study UID)
        queued: deque[tuple[str, list[InstanceRef]]] = deque()
        states: dict[str, _Study] = {}
        with cf.ThreadPoolExecutor(self.connections, thread_name_prefix="pacs") as pool:
            try:
                while True:
                    while len(inflight) < max_inflight:
                        if queued:
                            study_uid, unit = queued.popleft()
                            future = pool.submit(self._retrieve, unit)
                            inflight[future] = ("unit", study_uid)
                            continue
                        study = next(studies, None)
                        if study is None:
                            break
                        states[study.study_uid] = _Study(
                            StudyCompleteness(self.name, study.study_uid)
                        )
                        self.completeness[study.study_uid] = states[study.study_uid].completeness
                        future = pool.submit(self._list_study, study.study_uid)
                        inflight[future] = ("list", study.study_uid)
                    if not inflight:
                        break
                    yield from self._drain(inflight, queued, states)
            finally:
                for future in inflight:
                    future.cancel()

    def _list_study(
        self, study_uid: str
    ) -> tuple[StudyCompleteness, list[tuple[SeriesMatch, list[InstanceRef]]]]:
        """In a worker thread: the kept series of a study with their instances. A listing that
        fails makes the study partial (with the reason) unless the PACS is unreachable or
        refuses us, which stops the run."""
        counts = StudyCompleteness(self.name, study_uid)
        listed: list[tuple[SeriesMatch, list[InstanceRef]]] = []
        try:
            series_list = self.client.find_series(study_uid)
        except (PacsUnreachable, PacsAuthError):
            raise
        except PacsError as exc:
            counts.errors.append(str(exc))
            return counts, listed
        for series in series_list:
            modality = (series.modality or "").upper()
            if modality not in self.modalities or not body_part_wanted(
                series.body_part, self.body_parts
            ):
                counts.series_filtered += 1
                continue
            count = SeriesCount(series.series_uid, series.announced)
            counts.series[series.series_uid] = count
            try:
                refs = self.client.find_instances(series)
            except (PacsUnreachable, PacsAuthError):
                raise
            except PacsError as exc:
                counts.errors.append(str(exc))
                continue
            count.listed = len(refs)
            if refs:
                listed.append((series, refs))
        return counts, listed

    def _retrieve(self, unit: list[InstanceRef]) -> list[tuple[InstanceRef, InputFile, int]]:
        """In a worker thread: retrieve a unit; store each instance (spool or inline)."""
        out: list[tuple[InstanceRef, InputFile, int]] = []
        for ref, result in self.client.retrieve(unit):
            uri = source_uri(self.client.scheme, self.name, ref)  # type: ignore[arg-type]
            if isinstance(result, InstanceFailure):
                out.append((ref, ErroredFile(uri, str(result)), -1))
            else:
                out.append((ref, self._keep(uri, ref, result), len(result)))
        return out

    def _keep(self, uri: str, ref: InstanceRef, data: bytes) -> SourceFile:
        if self._spool is None:
            return SourceFile(uri=uri, path="", container="inline", size=len(data), data=data)
        name = hashlib.sha256(ref.sop_uid.encode()).hexdigest()[:40] + ".dcm"
        path = self._spool / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return SourceFile(uri=uri, path=str(path), size=len(data))

    def _drain(
        self,
        inflight: dict[cf.Future, tuple[str, str]],
        queued: deque[tuple[str, list[InstanceRef]]],
        states: dict[str, _Study],
    ) -> Iterator[InputFile]:
        done, _ = cf.wait(list(inflight), return_when=cf.FIRST_COMPLETED)
        for future in done:
            kind, study_uid = inflight.pop(future)
            state = states[study_uid]
            if kind == "list":
                counts, listed = future.result()  # PacsAuthError / PacsUnreachable stop the run
                state.completeness = self.completeness[study_uid] = counts
                state.listed = True
                self.report.series_filtered += counts.series_filtered
                self.report.series_selected += len(counts.series)
                for series, refs in listed:
                    self.report.instances_listed += len(refs)
                    for unit in self.client.work_units(series, refs):
                        queued.append((study_uid, unit))
                        state.pending += 1
                yield from self._finish_if_done(study_uid, states)
                continue
            state.pending -= 1
            results = future.result()
            for ref, src, size in results:
                count = state.completeness.series.get(ref.series_uid)
                if size < 0:
                    self.report.instances_failed += 1
                    if count is not None:
                        count.failed += 1
                    self._consecutive += 1
                else:
                    self.report.instances_retrieved += 1
                    self.report.bytes_retrieved += size
                    if count is not None:
                        count.arrived += 1
                    self._consecutive = 0
                state.files.append(src)
            if self._consecutive >= self.max_consecutive_failures:
                raise PacsUnreachable(
                    f"PACS {self.name!r}: {self._consecutive} instances in a row failed; "
                    f"stopping (last: {results[-1][1].error})"
                )
            yield from self._finish_if_done(study_uid, states)

    def _finish_if_done(self, study_uid: str, states: dict[str, _Study]) -> Iterator[InputFile]:
        state = states[study_uid]
        if not state.listed or state.pending:
            return
        del states[study_uid]
        if not state.completeness.complete:
            log.info("PACS %r: %s", self.name, state.completeness.reason)
        yield from state.files


def pacs_sources(
    spec: str,
    config: PacsConfig,
    *,
    window: StudyWindow | None = None,
    study_uids: Iterable[str] = (),
    policy: SelectionPolicy | None = None,
    connections: int | None = None,
    spool_dir: str | os.PathLike[str] | None = None,
) -> PacsRetrieval:
    """A retrieval run for a source argument (``pacs://main``, ``dicomweb+https://...``,
    ``dimse://AET@host:port`` or a configured name), as a context manager.

    ``policy`` (default: the default selection policy) gives the modalities queried (one
    query each) and the body parts a series must name when it names one; the header scan
    applies the whole policy to every instance afterwards, as for files. ``study_uids`` adds
    studies by UID (the ones partial last run). Raises ``PacsConfigError`` for an unknown name
    or a bad URL; the PACS is first contacted by ``prepare()``.
    """
    policy = policy or SelectionPolicy()
    entry = config.resolve(spec)
    return PacsRetrieval(
        make_client(entry),
        window=window,
        study_uids=study_uids,
        modalities=policy.modalities,
        body_parts=policy.body_parts,
        connections=connections,
        spool_dir=spool_dir,
    )
