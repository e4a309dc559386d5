"""The review page in a real browser (Playwright driving the system's headless Chromium), on
SQLite and on PostgreSQL (there the page connects as a login granted cxr_reviewer).

Screenshots of the worklist and a study page are written to $CXR_SCREEN_SCREENSHOT_DIR when it
is set (docs/screenshots for the README), else to the test's temporary folder.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

from conftest import VIEWER
from web_support import PASSWORD, REVIEWER, rows

XSS_NOTE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> RUL?'


def screenshot(page, tmp_path: Path, name: str, full_page: bool = False) -> None:
    folder = Path(os.environ.get("CXR_SCREEN_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def login(page, url: str, user: str = REVIEWER) -> None:
    page.goto(url + "/worklist")
    assert re.search(r"/login\?next=%2Fworklist$", page.url), page.url  # signed out: login page
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("form[action='/login'] button[type=submit]")
    page.wait_for_url(re.compile(r"/worklist$"))
    assert page.locator("#reviewer").inner_text() == user


def queue(db_url: str) -> list[dict]:
    """The default worklist as the database has it: each study's latest prediction, flagged,
    not reviewed, highest score first."""
    return rows(
        db_url,
        "SELECT study_instance_uid, score, model_id, threshold FROM v_worklist "
        "WHERE is_latest = 1 AND review_id IS NULL "
        "ORDER BY score DESC, study_instance_uid, model_id",
    )


def shown(page) -> list[tuple[str, float]]:
    return page.locator("#worklist tbody tr").evaluate_all(
        "rows => rows.map(r => [r.dataset.uid, parseFloat(r.dataset.score)])"
    )


def reviews_of(db_url: str, uid: str) -> list[dict]:
    return rows(
        db_url,
        "SELECT * FROM v_reviews WHERE study_instance_uid = :u ORDER BY created_at, review_id",
        u=uid,
    )


def images_loaded(page) -> list[int]:
    page.wait_for_function(
        "() => Array.from(document.querySelectorAll('#strip img, #preview')).every(i => i.complete)"
    )
    return page.locator("#strip img, #preview").evaluate_all(
        "imgs => imgs.map(i => i.naturalWidth)"
    )


def test_review_a_worklist_with_the_keyboard(site, page, tmp_path, corpus):
    url, db_url = site["url"], site["db_url"]
    expected = queue(db_url)
    assert len(expected) >= 3, "the corpus should flag at least three studies"
    flagged_scores = {r["study_instance_uid"]: r["score"] for r in expected}

    login(page, url)
    # The worklist: flagged, unreviewed studies, highest score first, as the database has them.
    listed = shown(page)
    assert [uid for uid, _ in listed] == [r["study_instance_uid"] for r in expected]
    scores = [score for _, score in listed]
    assert scores == sorted(scores, reverse=True)
    assert all(score >= r["threshold"] for score, r in zip(scores, expected, strict=True))
    not_flagged = rows(
        db_url, "SELECT study_instance_uid FROM v_study_results WHERE label = :f", f=False
    )
    assert not_flagged and not {r["study_instance_uid"] for r in not_flagged} & set(flagged_scores)
    assert page.locator("#not-diagnostic").is_visible()
    assert "Not for diagnostic use" in page.locator("#not-diagnostic").inner_text()
    assert page.locator("[data-count=matching]").inner_text() == str(len(expected))

    # j / k move the selection, Enter opens the selected study.
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.locator("#worklist tbody tr.selected").get_attribute("data-uid") == listed[2][0]
    page.keyboard.press("k")
    page.keyboard.press("k")
    first, second, third = (uid for uid, _ in listed[:3])
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(rf"/study/{re.escape(first)}\?"))

    # The study page: thumbnails load, score and threshold, model, viewer link, banner.
    widths = images_loaded(page)
    assert widths and all(w > 0 for w in widths), widths
    assert f"{flagged_scores[first]:.3f}" in page.locator("#score").inner_text()
    assert "webtest web-1" in page.locator("#model").inner_text()
    assert page.locator("#viewer").get_attribute("href") == VIEWER.format(study_uid=first)
    assert page.locator("#not-diagnostic").is_visible()
    assert "decoder" in page.locator(".pixels").inner_text()

    # `a`: an agree review with the reviewer's identity; the next study is shown.
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)
    page.keyboard.press("a")
    page.wait_for_url(re.compile(rf"/study/{re.escape(second)}\?"))
    assert "Recorded agree" in page.locator("#flash").inner_text()
    [agreed] = reviews_of(db_url, first)
    assert agreed["decision"] == "agree" and agreed["reviewer"] == REVIEWER
    assert agreed["reason"] is None
    assert agreed["model_version"] == "web-1"
    created = agreed["created_at"]
    if isinstance(created, str):  # SQLite: ISO text in UTC
        created = dt.datetime.fromisoformat(created).replace(tzinfo=dt.UTC)
    assert created >= before

    # `d`, a reason from the list (key 2), a note: a disagreement; on to the next study.
    page.keyboard.press("d")
    assert page.locator("#disagree-panel").get_attribute("open") is not None
    page.keyboard.press("2")
    page.fill("textarea[name=note]", XSS_NOTE)
    page.click("#disagree-submit")
    page.wait_for_url(re.compile(rf"/study/{re.escape(third)}\?"))
    [disagreed] = reviews_of(db_url, second)
    assert (disagreed["decision"], disagreed["reason"], disagreed["note"]) == (
        "disagree",
        "artefact",
        XSS_NOTE,
    )
    assert disagreed["reviewer"] == REVIEWER

    # The note is shown as text: no script ran, no element was injected.
    page.goto(f"{url}/study/{second}")
    assert page.locator("#history td.note").first.inner_text() == XSS_NOTE
    assert page.evaluate("window.__xss") is None
    assert page.locator("script").count() == 1  # app.js only
    assert page.locator("#history img").count() == 0

    # A later decision supersedes the earlier one; the history keeps both.
    page.goto(f"{url}/study/{first}")
    page.keyboard.press("d")
    page.keyboard.press("1")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/study/(?!" + re.escape(first) + r")"))
    page.goto(f"{url}/study/{first}")
    history = page.locator("#history tbody tr")
    assert history.count() == 2
    assert history.nth(0).get_attribute("class") == "counts"
    assert "disagree" in history.nth(0).inner_text()
    assert "No abnormality seen" in history.nth(0).inner_text()
    assert history.nth(1).get_attribute("class") == "superseded"
    assert "agree" in history.nth(1).inner_text()
    assert "Counts now: disagree" in page.locator("#current-decision").inner_text()
    latest = rows(
        db_url, "SELECT decision FROM v_latest_reviews WHERE study_instance_uid = :u", u=first
    )
    assert latest == [{"decision": "disagree"}]

    # The reviewed studies left the default worklist; the decision filter finds them.
    page.goto(f"{url}/worklist")
    assert {uid for uid, _ in shown(page)}.isdisjoint({first, second})
    page.select_option("select[name=decision]", "disagree")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"decision=disagree"))
    assert {uid for uid, _ in shown(page)} == {first, second}
    if site["backend"] == "sqlite":
        page.goto(f"{url}/worklist?reviewed=any")
        page.keyboard.press("j")
        screenshot(page, tmp_path, "worklist")

    # A study with a failed file: the reason is on its page.
    page.goto(f"{url}/study/{corpus['broken_study']}")
    assert "'Pixel Data' is truncated" in page.locator("#unscored").inner_text()
    assert corpus["broken_sop"] in page.locator("#unscored").inner_text()
    assert all(w > 0 for w in images_loaded(page))
    if site["backend"] == "sqlite":
        page.keyboard.press("d")  # the reasons a disagreement asks for
        screenshot(page, tmp_path, "study", full_page=True)
        page.keyboard.press("Escape")

    # Signing out ends the session: every page leads to the login page again.
    page.click("form[action='/logout'] button")
    page.wait_for_url(re.compile(r"/login$"))
    page.goto(f"{url}/study/{first}")
    assert "/login?next=" in page.url
    page.goto(f"{url}/worklist")
    assert "/login?next=" in page.url


def test_filters_and_pagination_over_250_studies(bulk_site, page):
    url, db_url = bulk_site["url"], bulk_site["db_url"]
    login(page, url)
    # Every flagged study, 50 a page: five pages, no study twice, score order throughout.
    page.goto(f"{url}/worklist?reviewed=any")
    seen: list[tuple[str, float]] = []
    for number in range(1, 6):
        listed = shown(page)
        assert len(listed) == 50
        first_row = (number - 1) * 50 + 1
        assert page.locator("#range").inner_text().startswith(f"rows {first_row}–{first_row + 49}")
        seen += listed
        if number < 5:
            with page.expect_navigation():
                page.keyboard.press("n")  # the next page, by keyboard
    assert page.locator("#next").count() == 0
    assert len({uid for uid, _ in seen}) == 250
    assert [s for _, s in seen] == sorted((s for _, s in seen), reverse=True)
    expected = rows(
        db_url,
        "SELECT study_instance_uid FROM v_worklist WHERE is_latest = 1 "
        "ORDER BY score DESC, study_instance_uid, model_id",
    )
    assert [uid for uid, _ in seen] == [r["study_instance_uid"] for r in expected]
    fifth = [uid for uid, _ in seen[150:200]]
    with page.expect_navigation():
        page.click("#prev")
    assert [uid for uid, _ in shown(page)] == fifth
    assert page.locator("#range").inner_text().startswith("rows 151–200")

    # Filters: study dates, a model version, reviewed or not, decision; the counts agree.
    page.goto(f"{url}/worklist")
    models = rows(db_url, "SELECT model_id, version FROM models ORDER BY version")
    older = next(m["model_id"] for m in models if m["version"] == "bulk-1")
    page.fill("input[name=from]", "2024-03-01")
    page.fill("input[name=to]", "2024-08-31")
    page.select_option("select[name=model]", str(older))
    page.select_option("select[name=reviewed]", "any")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"from=2024-03-01"))
    dates = bulk_site["expected"]["dates"]
    in_range = [
        uid for uid, day in dates.items() if dt.date(2024, 3, 1) <= day <= dt.date(2024, 8, 31)
    ]
    assert page.locator("[data-count=matching]").inner_text() == str(len(in_range))
    assert page.locator("[data-count=total]").inner_text() == str(len(in_range))
    listed = [uid for uid, _ in shown(page)]
    while page.locator("#next").count():
        with page.expect_navigation():
            page.click("#next")
        listed += [uid for uid, _ in shown(page)]
    assert sorted(listed) == sorted(in_range)

    reviewed = bulk_site["expected"]["reviewed"]
    page.goto(f"{url}/worklist?reviewed=yes")
    assert sorted(uid for uid, _ in shown(page)) == sorted(reviewed)
    assert page.locator("[data-count=unreviewed]").inner_text() == str(250 - len(reviewed))
    page.select_option("select[name=decision]", "disagree")
    page.click("#filters button[type=submit]")
    page.wait_for_url(re.compile(r"decision=disagree"))
    disagreed = sorted(uid for uid, d in reviewed.items() if d == "disagree")
    assert sorted(uid for uid, _ in shown(page)) == disagreed
    assert page.locator("[data-count=disagree]").inner_text() == str(len(disagreed))
    assert all("disagree" in t for t in page.locator("#worklist tbody tr").all_inner_texts())

    # The newer model version scored every fourth study: by default those show its score.
    page.goto(f"{url}/worklist?reviewed=any&model=all")
    assert page.locator("[data-count=total]").inner_text() == str(250 + 63)
