// cxr-screen review page: keyboard shortcuts and the image preview. No build step, no
// framework; everything also works without JavaScript (plain links and forms).
(function () {
  "use strict";

  function typing(event) {
    var t = event.target;
    return t && (t.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(t.tagName));
  }

  // One decision per page: a second key press or click while the first is on its way is
  // ignored (the server would append a second review).
  function submitOnce(form) {
    if (!form || form.dataset.sent) return;
    if (!form.checkValidity()) { form.reportValidity(); return; }
    form.dataset.sent = "1";
    form.submit();
  }

  function go(id) {
    var link = document.getElementById(id);
    if (link) window.location.assign(link.href);
  }

  // The counts read every flagged study in the scope: they follow the rows.
  function loadCounts() {
    var box = document.getElementById("counts");
    if (!box || !box.dataset.src || box.querySelector("[data-count]")) return;
    fetch(box.dataset.src, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) { box.innerHTML = html; })
      .catch(function () { box.textContent = "counts unavailable (reload to retry)"; });
  }

  function worklist() {
    loadCounts();
    var rows = Array.prototype.slice.call(document.querySelectorAll("#worklist tbody tr"));
    var current = rows.length ? 0 : -1;
    function select(i) {
      if (!rows.length) return;
      current = Math.max(0, Math.min(rows.length - 1, i));
      rows.forEach(function (r, k) { r.classList.toggle("selected", k === current); });
      rows[current].scrollIntoView({ block: "nearest" });
    }
    rows.forEach(function (row, i) {
      row.addEventListener("click", function (e) {
        if (e.target.tagName !== "A") window.location.assign(row.dataset.href);
      });
    });
    select(0);
    document.addEventListener("keydown", function (e) {
      if (typing(e) || e.ctrlKey || e.metaKey || e.altKey) return;
      if (e.key === "j") { select(current + 1); e.preventDefault(); }
      else if (e.key === "k") { select(current - 1); e.preventDefault(); }
      else if (e.key === "Enter" && current >= 0) { window.location.assign(rows[current].dataset.href); }
      else if (e.key === "n") { go("next"); }
      else if (e.key === "p") { go("prev"); }
    });
  }

  function study() {
    var preview = document.getElementById("preview");
    var caption = document.getElementById("preview-caption");
    var thumbs = Array.prototype.slice.call(document.querySelectorAll("#strip a.thumb"));
    var shown = 0;
    function show(i) {
      if (!preview || !thumbs.length) return;
      shown = (i + thumbs.length) % thumbs.length;
      preview.src = thumbs[shown].href;
      if (caption) caption.textContent = thumbs[shown].dataset.caption;
      thumbs.forEach(function (t, k) { t.classList.toggle("current", k === shown); });
    }
    thumbs.forEach(function (a, i) {
      a.addEventListener("click", function (e) { e.preventDefault(); show(i); });
    });
    var panel = document.getElementById("disagree-panel");
    var reasons = panel ? Array.prototype.slice.call(panel.querySelectorAll("input[name=reason]")) : [];
    document.querySelectorAll("form.decision-form").forEach(function (form) {
      form.addEventListener("submit", function (e) {
        if (form.dataset.sent) { e.preventDefault(); return; }
        form.dataset.sent = "1";
      });
    });
    document.addEventListener("keydown", function (e) {
      if (e.ctrlKey || e.metaKey || e.altKey) return;
      var inPanel = panel && panel.open;
      if (inPanel && e.key === "Escape") { panel.open = false; e.preventDefault(); return; }
      if (inPanel && !(e.target && e.target.tagName === "TEXTAREA")) {
        var n = parseInt(e.key, 10);
        if (n >= 1 && n <= reasons.length) { reasons[n - 1].checked = true; reasons[n - 1].focus(); e.preventDefault(); return; }
        if (e.key === "Enter") { e.preventDefault(); submitOnce(document.getElementById("disagree-form")); return; }
      }
      if (typing(e)) return;
      switch (e.key) {
        case "a": e.preventDefault(); submitOnce(document.getElementById("agree-form")); break;
        case "u": e.preventDefault(); submitOnce(document.getElementById("uncertain-form")); break;
        case "d":
          e.preventDefault();
          if (panel) { panel.open = true; if (reasons.length) reasons[0].focus(); }
          break;
        case "j": go("next-study"); break;
        case "k": go("prev-study"); break;
        case "w": go("back"); break;
        case "i": show(shown + 1); break;
      }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var page = document.body.dataset.page;
    if (page === "worklist") worklist();
    else if (page === "study") study();
  });
})();
