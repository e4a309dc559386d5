"""The dashboard, the CSV export and the study page's model versions, over 250 studies written
by the pipeline's writers (SQLite and PostgreSQL)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import re

import pytest
from web_support import rows, signed_in


@pytest.fixture
def client(bulk_site):
    c = signed_in(bulk_site["url"])
    try:
        yield c
    finally:
        c.close()


def test_dashboard_per_model_version_and_week(bulk_site, client):
    reviewed = bulk_site["expected"]["reviewed"]
    agree = sum(d == "agree" for d in reviewed.values())
    disagree = sum(d == "disagree" for d in reviewed.values())
    uncertain = sum(d == "uncertain" for d in reviewed.values())
    html = client.get("/dashboard").text
    sections = dict(
        re.findall(
            r'<section class="model-dash" data-model-id="\d+">\s*<h2>([^<]+)</h2>(.*?)</section>',
            html,
            re.S,
        )
    )
    assert set(sections) == {"bulk bulk-1", "bulk bulk-2"}
    today = dt.datetime.now(dt.UTC).date()  # weeks of the flag are UTC weeks
    monday = today - dt.timedelta(days=today.weekday())

    def week_row(section: str) -> list[str]:
        body = sections[section].split("<tbody>")[1]
        found = re.findall(r"<tr>(.*?)</tr>", body, re.S)
        assert len(found) == 1, "every prediction was made this week"
        return [c.strip() for c in re.findall(r"<td>(.*?)</td>", found[0], re.S)]

    ppv = f"{100 * agree / (agree + disagree):.0f}%"
    older = week_row("bulk bulk-1")
    assert older[:7] == [
        monday.isoformat(),
        "250",
        str(len(reviewed)),
        str(agree),
        str(disagree),
        str(uncertain),
        ppv,
    ]
    assert re.fullmatch(r"0\.0 h", older[7])  # reviewed moments after the flag
    # The newer version scored every 4th study; none of the reviewed ones (i = 1 mod 10).
    assert week_row("bulk bulk-2")[:3] == [monday.isoformat(), "63", "0"]
    # Three small plots per model version, drawn on the server.
    assert html.count("<svg") == 6
    assert html.count("<script") == 1
    assert client.get("/dashboard?weeks=0").status_code == 400


def test_csv_export_is_the_filtered_worklist(bulk_site, client):
    answer = client.get("/worklist.csv?reviewed=any&from=2024-03-01&to=2024-08-31")
    assert answer.status_code == 200
    assert re.fullmatch(
        r'attachment; filename="worklist-\d{8}-\d{4}\.csv"', answer.headers["content-disposition"]
    )
    table = list(csv.DictReader(io.StringIO(answer.text)))
    expected = rows(
        bulk_site["db_url"],
        "SELECT study_instance_uid FROM v_worklist WHERE is_latest = 1 "
        "AND study_date >= :a AND study_date <= :b "
        "ORDER BY score DESC, study_instance_uid, model_id",
        a=dt.date(2024, 3, 1),
        b=dt.date(2024, 8, 31),
    )
    assert [r["study_instance_uid"] for r in table] == [r["study_instance_uid"] for r in expected]
    assert len(table) > 50  # more than one page: the export is not paginated
    assert all("2024-03-01" <= r["study_date"] <= "2024-08-31" for r in table)
    reviewed = bulk_site["expected"]["reviewed"]
    for r in table:
        assert r["decision"] == reviewed.get(r["study_instance_uid"], "")
        if r["decision"] == "disagree":
            assert r["reason"] == "no_finding" and r["reviewer"] == "dr.bulk"
    # Unreviewed only (the default), as on the page.
    default = list(csv.DictReader(io.StringIO(client.get("/worklist.csv").text)))
    assert len(default) == 250 - len(reviewed)


def test_study_page_shows_every_model_version(bulk_site, client):
    study = bulk_site["expected"]["studies"][4]  # scored by both versions
    models = {
        r["version"]: r["model_id"]
        for r in rows(bulk_site["db_url"], "SELECT model_id, version FROM models")
    }
    page = client.get(f"/study/{study}").text
    assert "bulk bulk-2" in re.search(r'id="model">([^<]+)<', page)[1]  # the latest by default
    assert page.count('<section class="versions">') == 1
    older = client.get(f"/study/{study}?model_id={models['bulk-1']}").text
    assert "bulk bulk-1" in re.search(r'id="model">([^<]+)<', older)[1]
    # No thumbnail was stored for these studies: the page says so instead of a broken image.
    assert "no stored thumbnail" in page
    assert client.get("/study/1.2.3.4.5.6").status_code == 404
    bad = client.get("/worklist?from=2024-02-30")
    assert bad.status_code == 400 and "bad filter: from: not a date" in bad.text
