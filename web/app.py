"""The review web page: FastAPI routes over the SQL views, Jinja2 templates, no build step.

``create_app(settings)`` builds the application; ``cxr-screen web`` serves it with uvicorn.
Pages: ``/login``, ``/worklist`` (+ ``/worklist.csv``), ``/study/{uid}`` (+ its decision form),
``/dashboard``, ``/thumbs/{xx}/{name}.jpg`` (the stored review thumbnails), ``/static/*``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import secrets
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape
from sqlalchemy.engine import Engine
from starlette.middleware.sessions import SessionMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sql.db import ensure_schema, get_engine, normalize_url, session_factory
from sql.reviews import add_review
from sql.schema import DECISIONS
from web import auth, data, plots, present
from web.settings import WebSettings, get_web_settings

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSP = (
    "default-src 'self'; img-src 'self'; script-src 'self'; style-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
THUMBNAIL_CACHE = "private, max-age=86400"
STATIC_CACHE = "public, max-age=3600"
SESSION_COOKIE = "cxr_review_session"
DASHBOARD_WEEKS = 12


class LoginRequired(Exception):
    """Raised by the identity dependency when nobody is signed in."""


class SecurityHeaders:
    """Headers every response carries: CSP (no inline script or style), no framing, no
    sniffing, no referrer; pages are never cached, thumbnails and static files are."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                elapsed_ms = (time.perf_counter() - started) * 1000
                extra = [
                    # How long the server took to produce the response (its headers; pages
                    # are rendered whole before that), for benchmarks and browser dev tools.
                    (b"server-timing", f"app;dur={elapsed_ms:.1f}".encode()),
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                ]
                if b"cache-control" not in names:
                    cache = STATIC_CACHE if path.startswith("/static/") else "no-store"
                    extra.append((b"cache-control", cache.encode()))
                message["headers"] = headers + [(k, v) for k, v in extra if k not in names]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _clean_text(text: str, limit: int) -> str:
    """Free text as typed, without control characters (newlines and tabs kept), trimmed."""
    kept = "".join(
        ch for ch in text if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf")
    )
    return kept.strip()[:limit]


def _local_path(target: str | None) -> str:
    """``target`` when it is a path on this site (never another host), else the worklist."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/worklist"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/worklist"
    return target


def create_app(settings: WebSettings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """The application for ``settings`` (default: from the environment now)."""
    settings = settings or get_web_settings()
    engine = engine or open_database(settings.web_db_url)
    writer = session_factory(engine)
    thumbnails_root = Path(settings.thumbnails_dir).expanduser().absolute()
    lifetime_s = settings.web_session_hours * 3600
    revoked = auth.Revoked(lifetime_s)
    throttle = auth.LoginThrottle()
    counts_cache = data.CountsCache()
    proxies = auth.ProxyTrust.of(settings.web_proxy_user_header, settings.web_trusted_proxies)

    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = lambda v: present.when(v, settings.timezone)
    env.filters["age"] = present.age
    env.filters["score"] = lambda v: "—" if v is None else f"{float(v):.3f}"
    env.globals.update(
        DISAGREE_REASONS=data.DISAGREE_REASONS,
        DECISIONS=DECISIONS,
        NOTE_MAX=data.NOTE_MAX,
        quote=lambda s: quote(str(s), safe=""),
        thumb_url=lambda stored: (
            f"/thumbs/{rel}" if (rel := present.thumbnail_relpath(stored)) else None
        ),
        pixel_facts=present.pixel_facts,
    )

    # -- identity and CSRF ---------------------------------------------------------------------

    def identity(request: Request) -> str | None:
        peer = request.client.host if request.client else None
        proxied = proxies.user(peer, request.headers)
        if proxied:
            return proxied
        session = request.session
        user, sid, started = session.get("user"), session.get("sid"), session.get("at", 0)
        if not user or not sid or sid in revoked:
            return None
        if time.time() - float(started) > lifetime_s:
            return None
        if not auth.is_active(engine, user):  # disabled since: the session ends now
            return None
        return user

    def require_user(request: Request) -> str:
        user = identity(request)
        if user is None:
            raise LoginRequired()
        request.state.user = user
        return user

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = auth.new_token()
            request.session["csrf"] = token
        return token

    async def csrf_protect(request: Request) -> None:
        """Every state-changing request must carry the session's CSRF token (403 otherwise)."""
        if request.method in SAFE_METHODS:
            return
        given = request.headers.get(auth.CSRF_HEADER)
        if given is None:
            content_type = request.headers.get("content-type", "")
            if content_type.startswith(
                ("application/x-www-form-urlencoded", "multipart/form-data")
            ):
                form = await request.form()
                value = form.get(auth.CSRF_FIELD)
                given = value if isinstance(value, str) else None
        if not auth.tokens_match(request.session.get("csrf"), given):
            raise HTTPException(403, "missing or wrong CSRF token; reload the page and retry")
        origin = request.headers.get("origin")
        if origin and origin != "null":
            host = request.headers.get("host", "")
            if urlsplit(origin).netloc != host:
                raise HTTPException(403, "cross-origin request refused")

    app = FastAPI(
        title="cxr-screen review",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(csrf_protect)],  # every route: POSTs need the CSRF token
    )

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("user", getattr(request.state, "user", None))
        context["csrf"] = csrf_token(request)
        context["flash"] = request.session.pop("flash", None)
        context["request_path"] = request.url.path
        html = env.get_template(name).render(**context)
        return HTMLResponse(html, status_code=status)

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, _exc: LoginRequired) -> Response:
        if request.url.path.startswith("/thumbs/"):
            return PlainTextResponse("sign in first", status_code=401)
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        if request.url.path.startswith(("/thumbs/", "/static/")):
            return PlainTextResponse(str(exc.detail), status_code=exc.status_code)
        return render(request, "error.html", exc.status_code, message=str(exc.detail))

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> Response:
        detail = getattr(exc, "detail", None) or "not found"
        if request.url.path.startswith(("/thumbs/", "/static/")):
            return PlainTextResponse("not found", status_code=404)
        return render(request, "error.html", 404, message=str(detail))

    # -- sign in and out -----------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, next: str = "/worklist") -> Response:
        if identity(request):
            return RedirectResponse(_local_path(next), status_code=303)
        return render(request, "login.html", next=_local_path(next), error=None)

    @app.post("/login", response_class=HTMLResponse)
    async def login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username") or "").strip()
        password = str(form.get("password") or "")
        target = _local_path(str(form.get("next") or ""))
        peer = request.client.host if request.client else "?"
        keys = (f"user:{username.lower()}", f"addr:{peer}")
        if throttle.blocked(*keys):
            return render(
                request,
                "login.html",
                429,
                next=target,
                error="Too many failed attempts; wait a few minutes and try again.",
            )
        ok = await _run_sync(auth.verify_login, engine, username, password)
        if not ok:
            throttle.failed(*keys)
            logger.info("failed web login")
            return render(
                request, "login.html", 401, next=target, error="Wrong user name or password."
            )
        throttle.succeeded(*keys)
        request.session.clear()  # a new session: no fixation
        request.session.update(
            user=username, sid=secrets.token_urlsafe(16), at=time.time(), csrf=auth.new_token()
        )
        return RedirectResponse(target, status_code=303)

    @app.post("/logout")
    def logout(request: Request) -> Response:
        sid = request.session.get("sid")
        if sid:
            revoked.add(sid)
        request.session.clear()
        request.session["csrf"] = auth.new_token()
        return RedirectResponse("/login", status_code=303)

    @app.get("/")
    def home() -> Response:
        return RedirectResponse("/worklist", status_code=303)

    # -- worklist ------------------------------------------------------------------------------

    def parse_filters(params) -> data.Filters:
        try:
            return data.Filters.parse(params, settings.web_page_size)
        except data.FilterError as exc:
            raise HTTPException(400, f"bad filter: {exc}") from None

    def parse_cursor(params, name: str) -> data.Cursor | None:
        text = params.get(name)
        if not text:
            return None
        try:
            return data.Cursor.parse(name, text)
        except data.FilterError as exc:
            raise HTTPException(400, f"bad filter: {exc}") from None

    def parse_start(params) -> int:
        text = params.get("start") or "0"
        if not text.isdigit() or len(text) > 9:
            raise HTTPException(400, "bad filter: start: must be a whole number")
        return int(text)

    @app.get("/worklist", response_class=HTMLResponse)
    def worklist(request: Request, user: str = Depends(require_user)) -> Response:
        """One page of rows, at once; the counts follow from /worklist/counts (or inline with
        counts=1, for a browser without JavaScript)."""
        params = request.query_params
        filters = parse_filters(params)
        after = parse_cursor(params, "after")
        before = parse_cursor(params, "before")
        start = parse_start(params)  # the first row's number, carried from page to page
        counts = None
        with data.reader(engine) as conn:
            page = data.worklist_page(conn, filters, after=after, before=before)
            model_list = data.models(conn)
            if params.get("counts") == "1":
                counts = counts_cache.get(conn, filters)
        if (after is None and before is None) or (before is not None and not page.has_prev):
            start = 0
        return render(
            request,
            "worklist.html",
            filters=filters,
            page=page,
            counts=counts,
            start=start,
            models=model_list,
        )

    @app.get("/worklist/counts", response_class=HTMLResponse)
    def worklist_counts(request: Request, user: str = Depends(require_user)) -> Response:
        filters = parse_filters(request.query_params)
        with data.reader(engine) as conn:
            counts = counts_cache.get(conn, filters)
        html = env.get_template("counts.html").render(counts=counts, filters=filters)
        return HTMLResponse(html)

    @app.get("/worklist.csv")
    def worklist_csv(request: Request, user: str = Depends(require_user)) -> Response:
        filters = parse_filters(request.query_params)
        columns = [
            "study_instance_uid",
            "accession_number",
            "study_date",
            "model_name",
            "model_version",
            "score",
            "threshold",
            "n_images",
            "predicted_at",
            "decision",
            "reason",
            "note",
            "reviewer",
            "reviewed_at",
        ]

        def cell(value: Any) -> str:
            if value is None:
                return ""
            if isinstance(value, dt.datetime):
                return value.isoformat()
            text = str(value)
            # Spreadsheets run cells that start with these as formulas.
            return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text

        def rows() -> Iterator[str]:
            buffer = io.StringIO()
            out = csv.writer(buffer)
            out.writerow(columns)
            with data.reader(engine) as conn:
                for n, row in enumerate(data.worklist_rows(conn, filters), 1):
                    out.writerow([cell(row[c]) for c in columns])
                    if n % 500 == 0:
                        yield buffer.getvalue()
                        buffer.seek(0)
                        buffer.truncate()
            yield buffer.getvalue()

        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
        return StreamingResponse(
            rows(),
            media_type="text/csv; charset=utf-8",
            headers={"content-disposition": f'attachment; filename="worklist-{stamp}.csv"'},
        )

    # -- one study -----------------------------------------------------------------------------

    def back_filters(text: str | None) -> data.Filters:
        """The worklist filters a study page was opened with (carried as ``back``)."""
        return parse_filters(dict(parse_qsl(text or "", keep_blank_values=True)))

    def study_url(uid: str, model_id: int | None, filters: data.Filters) -> str:
        query = f"model_id={model_id}" if model_id else ""
        back = filters.query()
        if back:
            query += ("&" if query else "") + "back=" + quote(back, safe="")
        return f"/study/{quote(uid, safe='')}" + (f"?{query}" if query else "")

    env.globals["study_url"] = study_url

    def load_study(uid: str, model_id: int | None) -> data.Study:
        if not data.valid_uid(uid):
            raise HTTPException(404, "no such study")
        with data.reader(engine) as conn:
            found = data.study(conn, uid, model_id)
        if found is None:
            raise HTTPException(404, "no such study")
        return found

    def model_id_param(text: str | None) -> int | None:
        if not text:
            return None
        if not text.isdigit() or len(text) > 10:
            raise HTTPException(400, "model_id: must be a whole number")
        return int(text)

    @app.get("/study/{uid}", response_class=HTMLResponse)
    def study_page(request: Request, uid: str, user: str = Depends(require_user)) -> Response:
        params = request.query_params
        filters = back_filters(params.get("back"))
        found = load_study(uid, model_id_param(params.get("model_id")))
        cursor = data.Cursor(
            float(found.prediction["score"]), uid, int(found.prediction["model_id"])
        )
        with data.reader(engine) as conn:
            following = data.neighbour(conn, filters, cursor, forward=True)
            preceding = data.neighbour(conn, filters, cursor, forward=False)
        return render(
            request,
            "study.html",
            study=found,
            filters=filters,
            following=following,
            preceding=preceding,
            viewer=present.viewer_url(
                settings.viewer_url_template, uid, found.prediction["accession_number"]
            ),
            error=None,
        )

    @app.post("/study/{uid}/review", response_class=HTMLResponse)
    async def review(request: Request, uid: str, user: str = Depends(require_user)) -> Response:
        form = await request.form()
        filters = back_filters(str(form.get("back") or ""))
        decision = str(form.get("decision") or "")
        reason = str(form.get("reason") or "").strip() or None
        note = _clean_text(str(form.get("note") or ""), data.NOTE_MAX) or None
        model_id = model_id_param(str(form.get("model_id") or ""))
        found = await _run_sync(load_study, uid, model_id)
        problem = None
        if decision not in DECISIONS:
            problem = f"decision must be one of {', '.join(DECISIONS)}"
        elif decision == "disagree" and reason not in data.DISAGREE_REASONS:
            problem = "a disagreement needs a reason from the list"
        elif decision != "disagree" and reason is not None:
            problem = "only a disagreement takes a reason"
        if problem:
            return render(
                request,
                "study.html",
                400,
                study=found,
                filters=filters,
                following=None,
                preceding=None,
                viewer=None,
                error=problem,
            )

        def write() -> int:
            with writer.begin() as session:
                return add_review(
                    session,
                    study_instance_uid=uid,
                    decision=decision,
                    reviewer=user,
                    note=note,
                    model_id=int(found.prediction["model_id"]),
                    reason=reason,
                )

        review_id = await _run_sync(write)
        counts_cache.clear()
        logger.info("review %s recorded", review_id)
        accession = found.prediction["accession_number"] or uid
        label = decision + (f" ({data.DISAGREE_REASONS[reason]})" if reason else "")
        request.session["flash"] = f"Recorded {label} for {accession}."
        cursor = data.Cursor(
            float(found.prediction["score"]), uid, int(found.prediction["model_id"])
        )

        def following() -> dict | None:
            with data.reader(engine) as conn:
                return data.neighbour(conn, filters, cursor, forward=True)

        nxt = await _run_sync(following)
        if nxt is None:
            request.session["flash"] += " That was the last study of this worklist."
            query = filters.query()
            return RedirectResponse("/worklist" + (f"?{query}" if query else ""), 303)
        return RedirectResponse(
            study_url(nxt["study_instance_uid"], nxt["model_id"], filters), status_code=303
        )

    # -- images ----------------------------------------------------------------------------------

    @app.get("/thumbs/{rel:path}")
    def thumbnail(request: Request, rel: str, user: str = Depends(require_user)) -> Response:
        path = present.thumbnail_file(thumbnails_root, rel)
        if path is None:
            raise HTTPException(404, "not found")
        stat = path.stat()
        etag = f'"{stat.st_mtime_ns:x}-{stat.st_size:x}"'
        headers = {"cache-control": THUMBNAIL_CACHE, "etag": etag}
        if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
            return Response(status_code=304, headers=headers)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    # -- dashboard -------------------------------------------------------------------------------

    @app.get("/dashboard", response_class=HTMLResponse)
    def dashboard(request: Request, user: str = Depends(require_user)) -> Response:
        text = request.query_params.get("weeks") or str(DASHBOARD_WEEKS)
        if not text.isdigit() or not 1 <= int(text) <= 104:
            raise HTTPException(400, "weeks: a whole number from 1 to 104")
        weeks = int(text)
        with data.reader(engine) as conn:
            per_model = data.dashboard(conn, weeks)
        charts = []
        for entry in per_model:
            labels = [w.week.strftime("%m-%d") for w in entry["weeks"]]
            charts.append(
                {
                    **entry,
                    "volume": plots.bars(
                        labels,
                        [
                            ("flagged", [w.flagged for w in entry["weeks"]], "#c9a227"),
                            ("reviewed", [w.reviewed for w in entry["weeks"]], "#1f5fa8"),
                        ],
                        f"Flagged and reviewed per week, {entry['name']} {entry['version']}",
                    ),
                    "ppv": plots.line(
                        labels,
                        [w.ppv for w in entry["weeks"]],
                        f"Agreement rate (PPV) per week, {entry['name']} {entry['version']}",
                        "%",
                    ),
                    "latency": plots.line(
                        labels,
                        [w.median_hours for w in entry["weeks"]],
                        f"Median hours to review per week, {entry['name']} {entry['version']}",
                        "h",
                    ),
                }
            )
        return render(request, "dashboard.html", charts=charts, weeks=weeks)

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    # Outermost last: headers on everything, the session around the routes.
    app.add_middleware(
        SessionMiddleware,
        secret_key=settings.session_secret(),
        session_cookie=SESSION_COOKIE,
        max_age=int(lifetime_s),
        same_site="lax",
        https_only=settings.secure_cookies,
    )
    app.add_middleware(SecurityHeaders)
    app.state.engine = engine
    app.state.settings = settings
    return app


def open_database(url: str) -> Engine:
    """The page's engine, its schema checked (and migrated when this user may). On PostgreSQL
    without JIT compilation: the page's queries read one page through an index, and compiling
    them cost more (~70 ms) than running them (~10 ms at 100,000 studies)."""
    if normalize_url(url).get_backend_name() == "postgresql":
        engine = get_engine(url, connect_args={"options": "-c timezone=UTC -c jit=off"})
    else:
        engine = get_engine(url)
    ensure_schema(engine)
    return engine


async def _run_sync(fn, *args):
    """Run blocking work (argon2, database) in the thread pool, off the event loop."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
