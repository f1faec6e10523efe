// Live updates for the tidings dashboard: the pages are whole without this script; it listens to
// /events (server-sent events) and re-fetches the fragments marked data-live whose data-live-on
// names the event, at most one fetch at a time per fragment, and all of them once the stream opens.
(function () {
  "use strict";
  var indicator = document.getElementById("live");
  var pending = new Map();

  function refresh(element) {
    if (pending.get(element)) { pending.set(element, "again"); return; }
    pending.set(element, "busy");
    setTimeout(function () {
      fetch(element.dataset.live, { headers: { "Accept": "text/html" } })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) { if (html !== null) { element.innerHTML = html; } })
        .catch(function () {})
        .finally(function () {
          var again = pending.get(element) === "again";
          pending.delete(element);
          if (again) { refresh(element); }
        });
    }, 250);  // a burst of events makes one fetch
  }

  function on(kind, data) {
    document.querySelectorAll("[data-live]").forEach(function (element) {
      var kinds = (element.dataset.liveOn || "").split(" ");
      if (kinds.indexOf(kind) < 0) { return; }
      var wanted = element.dataset.correlation;
      if (wanted && data && data.correlations && data.correlations.indexOf(wanted) < 0) { return; }
      refresh(element);
    });
  }

  function state(text, ok) {
    if (!indicator) { return; }
    indicator.textContent = text;
    indicator.className = "live " + (ok ? "on" : "off");
  }

  if (!window.EventSource || !document.querySelector("[data-live]")) { state("static", false); return; }
  var source = new EventSource("/events");
  // At every (re)connection the fragments are fetched once: what happened between the page being
  // rendered (or the stream dropping) and the stream opening sent events no one heard.
  source.onopen = function () {
    state("live", true);
    document.querySelectorAll("[data-live]").forEach(refresh);
  };
  source.onerror = function () { state("reconnecting", false); };
  ["message", "heartbeat", "failed"].forEach(function (kind) {
    source.addEventListener(kind, function (event) {
      var data = null;
      try { data = JSON.parse(event.data); } catch (e) { data = null; }
      on(kind, data);
    });
  });
})();
