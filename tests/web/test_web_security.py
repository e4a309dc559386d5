"""The review page's security: CSRF, escaping, bound filter values, image paths, no patient
identifiers, sessions, trusted proxies, and (PostgreSQL) a reviewer login that can write
nothing but reviews. Over HTTP against the live server, on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa
from conftest import _serve
from web_support import PASSWORD, REVIEWER, csrf_of, rows, signed_in

from sql.schema import metadata


@pytest.fixture
def client(site) -> Iterator[httpx.Client]:
    c = signed_in(site["url"])
    try:
        yield c
    finally:
        c.close()


def unflagged_study(db_url: str) -> dict:
    """A study the model did not flag (decisions on it leave the worklist to the other tests)."""
    found = rows(
        db_url,
        "SELECT study_instance_uid, model_id, accession_number FROM v_study_results "
        "WHERE label = :f ORDER BY score",
        f=False,
    )
    assert found
    return found[0]


def count_reviews(db_url: str) -> int:
    return rows(db_url, "SELECT COUNT(*) AS n FROM v_reviews")[0]["n"]


def post_routes(app) -> list[str]:
    return sorted(
        route.path.replace("{uid}", "1.2.3")
        for route in app.routes
        if "POST" in getattr(route, "methods", set())
    )


def test_every_post_without_the_csrf_token_is_refused(site, client):
    routes = post_routes(site["app"])
    assert {"/login", "/logout", "/study/1.2.3/review"} <= set(routes)
    study = unflagged_study(site["db_url"])
    before = count_reviews(site["db_url"])
    other = httpx.Client(base_url=site["url"])
    foreign_token = csrf_of(other.get("/login").text)  # another session's token
    for path in routes:
        path = path.replace("1.2.3", study["study_instance_uid"])
        form = {"decision": "agree", "model_id": str(study["model_id"]), "back": ""}
        for token in (None, "", "forged", foreign_token):
            data = dict(form) if token is None else {**form, "csrf_token": token}
            answer = client.post(path, data=data)
            assert answer.status_code == 403, (path, token, answer.status_code)
            assert "CSRF" in answer.text
    # The header works instead of the field; a wrong header is refused too.
    page = client.get(f"/study/{study['study_instance_uid']}")
    answer = client.post(
        f"/study/{study['study_instance_uid']}/review",
        data={"decision": "uncertain", "model_id": str(study["model_id"])},
        headers={"x-csrf-token": "forged"},
    )
    assert answer.status_code == 403
    assert count_reviews(site["db_url"]) == before
    # Still signed in (the refused logout did nothing); with the token a decision goes through.
    assert client.get("/worklist").status_code == 200
    answer = client.post(
        f"/study/{study['study_instance_uid']}/review",
        data={"decision": "uncertain", "model_id": str(study["model_id"])},
        headers={"x-csrf-token": csrf_of(page.text)},
    )
    assert answer.status_code == 303
    assert count_reviews(site["db_url"]) == before + 1
    # A cross-origin form post carrying a valid token is refused as well.
    answer = client.post(
        "/logout",
        data={"csrf_token": csrf_of(page.text)},
        headers={"origin": "https://evil.example"},
    )
    assert answer.status_code == 403
    other.close()


def test_a_script_in_a_note_or_reason_is_rendered_inert(site, client):
    study = unflagged_study(site["db_url"])
    uid = study["study_instance_uid"]
    token = csrf_of(client.get(f"/study/{uid}").text)
    note = "<script>alert('note')</script><b onmouseover=alert(1)>x</b>"
    answer = client.post(
        f"/study/{uid}/review",
        data={
            "decision": "disagree",
            "reason": "other",
            "note": note,
            "model_id": str(study["model_id"]),
            "csrf_token": token,
        },
    )
    assert answer.status_code == 303
    html = client.get(f"/study/{uid}").text
    assert (
        "&lt;script&gt;alert(&#39;note&#39;)&lt;/script&gt;&lt;b onmouseover=alert(1)&gt;" in html
    )
    assert "<script>alert" not in html and "<b onmouseover" not in html
    assert html.count("<script") == 1  # app.js
    # A reason must come from the list: a script there is refused, and not echoed raw.
    answer = client.post(
        f"/study/{uid}/review",
        data={
            "decision": "disagree",
            "reason": "<script>alert('reason')</script>",
            "model_id": str(study["model_id"]),
            "csrf_token": token,
        },
    )
    assert answer.status_code == 400
    assert "needs a reason from the list" in answer.text
    assert "<script>alert" not in answer.text
    # The page forbids inline script anyway.
    csp = answer.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    # The CSV export is a download (never rendered), and formula-like cells are defused.
    token = csrf_of(client.get(f"/study/{uid}").text)
    client.post(
        f"/study/{uid}/review",
        data={
            "decision": "disagree",
            "reason": "other",
            "note": '=HYPERLINK("http://evil.example")',
            "model_id": str(study["model_id"]),
            "csrf_token": token,
        },
    )
    export = client.get("/worklist.csv?reviewed=any&model=all")
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("text/csv")
    assert export.headers["content-disposition"].startswith("attachment;")


HOSTILE = [
    "' OR '1'='1",
    "1 OR 1=1",
    "1; DROP TABLE reviews; --",
    "agree' UNION SELECT password_hash FROM web_users --",
    "2024-01-01' OR 1=1 --",
    "0.9~1.2.3' OR 1=1 --~1",
    "0.5~1.2.3~1 OR 1=1",
    "\x00",
    "é" * 90,
    "1e999~1.2~1",
]
WORKLIST_PATHS = ("/worklist", "/worklist/counts", "/worklist.csv")
PARAMETERS = ["from", "to", "model", "reviewed", "decision", "size", "after", "before", "start"]
BENIGN = {
    "from": "2024-01-01",
    "to": "2024-12-31",
    "model": "1",
    "reviewed": "any",
    "decision": "agree",
    "size": "20",
    "after": "0.9~1.2.3~1",
    "before": "0.1~1.2.3~1",
    "start": "50",
}


def test_hostile_filter_values_cannot_change_the_sql(site, client):
    """Filter values are checked, then bound: the statements the database runs are the same
    texts as with well-formed values, and no hostile text ever reaches one."""
    statements: list[str] = []

    def record(_conn, _cursor, statement, _params, _context, _many):
        statements.append(statement)

    engine = site["engine"]
    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        benign: dict[str, set[str]] = {}
        for name, value in BENIGN.items():
            statements.clear()
            for path in WORKLIST_PATHS:
                assert client.get(path, params={name: value}).status_code == 200, name
            benign[name] = set(statements)
        before = count_reviews(site["db_url"])
        for name in PARAMETERS:
            for value in HOSTILE:
                statements.clear()
                for path in WORKLIST_PATHS:
                    answer = client.get(path, params={name: value})
                    assert answer.status_code in (200, 400), (name, value, answer.status_code)
                    if answer.status_code == 400:
                        assert f"bad filter: {name}" in answer.text
                        assert "<script" not in answer.text.replace(
                            '<script src="/static/app.js" defer></script>', ""
                        )
                assert set(statements) <= benign[name], (name, value)
                for statement in statements:
                    assert value not in statement
        # Path and form values: a hostile study UID or model id never reaches the database.
        statements.clear()
        for path in (
            "/study/1.2.3' OR '1'='1",
            "/study/1.2.3%27%20OR%201=1--",
            "/study/..%2F..%2Fetc%2Fpasswd",
        ):
            assert client.get(path).status_code == 404
        assert client.get("/study/1.2.3", params={"model_id": "1 OR 1=1"}).status_code == 400
        assert client.get("/dashboard", params={"weeks": "1; DROP TABLE x"}).status_code == 400
        assert not any("OR" in s and "1=1" in s for s in statements)
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)
    assert count_reviews(site["db_url"]) == before
    tables = rows(site["db_url"], "SELECT COUNT(*) AS n FROM web_users")
    assert tables[0]["n"] >= 2


def raw_get(base_url: str, path: str, cookie: str) -> int:
    """A GET with the path sent exactly as given (no client-side normalisation of '..')."""
    host, port = base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.putheader("Cookie", cookie)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_dot_dot_in_an_image_url_is_404(site, client, tmp_path):
    home = site["home"]
    thumbs = home / "thumbnails"
    real = sorted(thumbs.glob("*/*.jpg"))
    assert real, "the screening run should have written thumbnails"
    good = "/".join(real[0].parts[-2:])
    answer = client.get(f"/thumbs/{good}")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    assert answer.content[:3] == b"\xff\xd8\xff"
    assert answer.headers["cache-control"] == "private, max-age=86400"
    assert (
        client.get(f"/thumbs/{good}", headers={"if-none-match": answer.headers["etag"]}).status_code
        == 304
    )
    # Secrets next to the thumbnails, a file outside, and a link planted inside.
    secret = home / "hmac.key"
    secret.write_text("do-not-serve")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"\xff\xd8\xff not a thumbnail")
    planted = thumbs / "ab" / "0123456789abcdef.jpg"
    planted.parent.mkdir(exist_ok=True)
    planted.symlink_to(outside)
    try:
        cookie = "; ".join(f"{k}={v}" for k, v in client.cookies.items())
        for path in (
            "/thumbs/../hmac.key",
            "/thumbs/../../etc/passwd",
            "/thumbs/..%2fhmac.key",
            "/thumbs/..%2F..%2Fetc%2Fpasswd",
            "/thumbs/%2e%2e/hmac.key",
            "/thumbs/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
            f"/thumbs/{good}/../../hmac.key",
            "/thumbs//etc/passwd",
            f"/thumbs/{os.fspath(outside)}",
            "/thumbs/ab/0123456789abcdef.jpg",  # the planted link
            "/thumbs/ab/../ab/0123456789abcdef.jpg",
            "/thumbs/..\\hmac.key",
        ):
            assert raw_get(site["url"], path, cookie) == 404, path
        assert raw_get(site["url"], f"/thumbs/{good}", cookie) == 200
        # Thumbnails need a signed-in user.
        assert raw_get(site["url"], f"/thumbs/{good}", "") == 401
    finally:
        planted.unlink()
        secret.unlink()


def test_no_page_shows_a_patient_name_id_or_birth_date(site, client, corpus):
    patients = corpus["patients"]
    needles = set(patients["ids"]) | set(patients["names"]) | set(patients["birth_dates"])
    needles |= {f"{d[:4]}-{d[4:6]}-{d[6:]}" for d in patients["birth_dates"]}
    needles |= {n.replace("^", " ") for n in patients["names"]}
    needles |= {"SYNTHETIC^PATIENT", "SYNTHETIC PATIENT", "SYNPID"}
    pages = {
        "/login (signed out)": httpx.get(site["url"] + "/login").text,
        "/worklist": client.get("/worklist?reviewed=any&model=all").text,
        "/worklist.csv": client.get("/worklist.csv?reviewed=any&model=all").text,
        "/dashboard": client.get("/dashboard").text,
        "error page": client.get("/study/9.9.9").text,
    }
    studies = rows(
        site["db_url"], "SELECT study_instance_uid, accession_number FROM v_study_results"
    )
    assert len(studies) >= 5
    for study in studies:
        page = client.get(f"/study/{study['study_instance_uid']}")
        assert page.status_code == 200
        assert study["accession_number"] in page.text  # the page really shows the study
        pages[f"/study/{study['study_instance_uid']}"] = page.text
    assert "SYNACC" in pages["/worklist"] and "SYNACC" in pages["/worklist.csv"]
    for name, text in pages.items():
        found = sorted(n for n in needles if n in text)
        assert not found, f"{name} shows {found}"


def test_session_cookie_flags_logout_and_disabled_users(site):
    from web.auth import add_user, disable_user

    # A login form posted without the session that showed it has no valid token: refused.
    answer = httpx.post(
        site["url"] + "/login",
        data={"username": REVIEWER, "password": PASSWORD, "csrf_token": "t"},
    )
    assert answer.status_code == 403
    # The cookie the login sets: HttpOnly, SameSite=Lax, no Secure on plain HTTP, 12 hours.
    with httpx.Client(base_url=site["url"]) as fresh:
        token = csrf_of(fresh.get("/login").text)
        answer = fresh.post(
            "/login", data={"username": REVIEWER, "password": PASSWORD, "csrf_token": token}
        )
        assert answer.status_code == 303
        flags = answer.headers["set-cookie"].lower()
        assert flags.startswith("cxr_review_session=")
        assert "httponly" in flags and "samesite=lax" in flags and "secure" not in flags
        assert "max-age=43200" in flags
        # A fresh session id and CSRF token at login (no fixation of the pre-login session).
        assert fresh.cookies.get("cxr_review_session") != token
    # Signing out revokes the session: replaying the old cookie leads to the login page.
    client = signed_in(site["url"])
    token = csrf_of(client.get("/worklist").text)
    stolen = client.cookies.get("cxr_review_session")
    assert client.post("/logout", data={"csrf_token": token}).status_code == 303
    replay = httpx.get(
        site["url"] + "/worklist", cookies={"cxr_review_session": stolen}, follow_redirects=False
    )
    assert replay.status_code == 303 and replay.headers["location"].startswith("/login")
    # A tampered cookie is no session at all.
    forged = stolen[:-4] + ("AAAA" if not stolen.endswith("AAAA") else "BBBB")
    answer = httpx.get(
        site["url"] + "/worklist", cookies={"cxr_review_session": forged}, follow_redirects=False
    )
    assert answer.status_code == 303
    # A disabled user's open session ends at its next request; it cannot sign in again.
    owner = sa.create_engine(site["db_url"])
    try:
        add_user(owner, "dr.temp", PASSWORD)
        temp = signed_in(site["url"], "dr.temp")
        assert temp.get("/worklist").status_code == 200
        disable_user(owner, "dr.temp")
        assert temp.get("/worklist").status_code == 303
        with httpx.Client(base_url=site["url"]) as again:
            token = csrf_of(again.get("/login").text)
            answer = again.post(
                "/login", data={"username": "dr.temp", "password": PASSWORD, "csrf_token": token}
            )
            assert answer.status_code == 401
    finally:
        owner.dispose()


def test_wrong_passwords_are_throttled(site):
    with httpx.Client(base_url=site["url"]) as c:
        token = csrf_of(c.get("/login").text)
        codes = [
            c.post(
                "/login", data={"username": "dr.lee", "password": "wrong-pw", "csrf_token": token}
            ).status_code
            for _ in range(6)
        ]
        assert codes[:5] == [401] * 5 and codes[5] == 429
        # Even the right password waits now.
        answer = c.post(
            "/login", data={"username": "dr.lee", "password": PASSWORD, "csrf_token": token}
        )
        assert answer.status_code == 429


def test_secure_cookies_behind_tls(site):
    """Behind a TLS-terminating proxy (CXR_SCREEN_WEB_SECURE_COOKIES=true) the session cookie
    is marked Secure: the browser never sends it over plain HTTP."""
    with (
        _serve(site["backend"], site["db_url"], site["home"], web_secure_cookies=True) as served,
        httpx.Client(base_url=served["url"]) as c,
    ):
        shown = c.get("/login")
        assert "; secure" in shown.headers["set-cookie"].lower()
        # A client on plain HTTP keeps the cookie to itself: the login's CSRF check fails.
        token = csrf_of(shown.text)
        data = {"username": REVIEWER, "password": PASSWORD, "csrf_token": token}
        assert c.post("/login", data=data).status_code == 403
        # Sent back (as a browser does over HTTPS), the login goes through, Secure again.
        session = shown.headers["set-cookie"].split(";")[0]
        answer = c.post("/login", data=data, headers={"cookie": session})
        assert answer.status_code == 303
        flags = answer.headers["set-cookie"].lower()
        assert "; secure" in flags and "httponly" in flags


@contextlib.contextmanager
def proxied_site(site, trusted: str) -> Iterator[str]:
    with _serve(
        site["backend"],
        site["db_url"],
        site["home"],
        web_proxy_user_header="X-Remote-User",
        web_trusted_proxies=trusted,
    ) as served:
        yield served["url"]


def test_a_proxy_header_counts_only_from_a_trusted_proxy(site):
    study = unflagged_study(site["db_url"])
    uid = study["study_instance_uid"]
    with proxied_site(site, "127.0.0.1") as url, httpx.Client(base_url=url) as c:
        headers = {"x-remote-user": "dr.proxy"}
        page = c.get(f"/study/{uid}", headers=headers, follow_redirects=False)
        assert page.status_code == 200 and ">dr.proxy<" in page.text
        answer = c.post(
            f"/study/{uid}/review",
            data={
                "decision": "agree",
                "model_id": str(study["model_id"]),
                "csrf_token": csrf_of(page.text),
            },
            headers=headers,
            follow_redirects=False,
        )
        assert answer.status_code == 303
        latest = rows(
            site["db_url"],
            "SELECT reviewer FROM v_latest_reviews WHERE study_instance_uid = :u",
            u=uid,
        )
        assert latest == [{"reviewer": "dr.proxy"}]
        # A malformed name is not believed.
        bad = c.get("/worklist", headers={"x-remote-user": "<b>x"}, follow_redirects=False)
        assert bad.status_code == 303
    with proxied_site(site, "10.9.9.9/32") as url, httpx.Client(base_url=url) as c:
        # From an address that is not a trusted proxy the header is ignored, even with a
        # forged X-Forwarded-For naming the proxy.
        for headers in (
            {"x-remote-user": "dr.proxy"},
            {"x-remote-user": "dr.proxy", "x-forwarded-for": "10.9.9.9"},
        ):
            answer = c.get("/worklist", headers=headers, follow_redirects=False)
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/login")


@pytest.mark.parametrize("screened", ["postgresql"], indirect=True)
def test_the_reviewer_login_writes_nothing_but_reviews(site, client):
    """On PostgreSQL the page connects as a login granted cxr_reviewer: decisions go through,
    and every other table stays exactly as it was."""
    from web.auth import add_user

    engine = site["engine"]
    assert engine.url.username.startswith("cxr_web_")
    owner = sa.create_engine(site["db_url"])

    def snapshot() -> dict[str, list]:
        with owner.connect() as conn:
            return {
                t.name: sorted(map(repr, conn.execute(sa.select(t)).all()))
                for t in metadata.sorted_tables
                if t.name != "reviews"
            }

    try:
        before = snapshot()
        reviews_before = count_reviews(site["db_url"])
        study = unflagged_study(site["db_url"])
        uid = study["study_instance_uid"]
        for decision, reason in (("agree", None), ("disagree", "poor_quality")):
            token = csrf_of(client.get(f"/study/{uid}").text)
            data = {"decision": decision, "model_id": str(study["model_id"]), "csrf_token": token}
            if reason:
                data["reason"] = reason
            assert client.post(f"/study/{uid}/review", data=data).status_code == 303
        assert count_reviews(site["db_url"]) == reviews_before + 2
        for statement in (
            "INSERT INTO web_users (username, password_hash) VALUES ('mallory', 'x')",
            "UPDATE web_users SET active = false",
            "UPDATE reviews SET decision = 'agree'",
            "DELETE FROM reviews",
            "UPDATE study_predictions SET label = false",
            "DELETE FROM file_outcomes",
            "INSERT INTO studies (study_instance_uid) VALUES ('1.2.3')",
            "UPDATE models SET threshold = 0",
            "SELECT * FROM instances",
        ):
            with (
                pytest.raises(sa.exc.ProgrammingError, match="permission denied"),
                engine.begin() as conn,
            ):
                conn.exec_driver_sql(statement)
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            add_user(engine, "mallory", PASSWORD)
        assert snapshot() == before
        # The page's own requests through that login changed nothing else either.
        for path in ("/worklist", "/dashboard", "/worklist.csv", f"/study/{uid}"):
            assert client.get(path).status_code == 200
        assert snapshot() == before
    finally:
        owner.dispose()


def test_headers_on_every_page(site, client):
    for path in ("/worklist", "/dashboard", "/login"):
        answer = client.get(path)
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-frame-options"] == "DENY"
        assert answer.headers["referrer-policy"] == "no-referrer"
        assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
    static = client.get("/static/app.css")
    assert static.status_code == 200 and "max-age" in static.headers["cache-control"]
    assert re.fullmatch(r'"[0-9a-f]+"', static.headers["etag"])


def test_login_redirects_only_within_the_site(site):
    for target, expected in (
        ("/study/1.2.3?model_id=1", "/study/1.2.3?model_id=1"),
        ("//evil.example/x", "/worklist"),
        ("https://evil.example/", "/worklist"),
        ("/\\evil.example", "/worklist"),
        ("javascript:alert(1)", "/worklist"),
    ):
        with httpx.Client(base_url=site["url"]) as c:
            token = csrf_of(c.get("/login").text)
            data = {"username": REVIEWER, "password": PASSWORD, "csrf_token": token}
            answer = c.post("/login", data={**data, "next": target})
            assert answer.status_code == 303
            assert answer.headers["location"] == expected, target
