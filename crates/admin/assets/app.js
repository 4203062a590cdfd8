// The one script of our own: times in the operator's time zone. A <time data-ms> is
// rendered in UTC by the node; the browser shows it in its own zone, after every swap too.
(function () {
  var zone = (Intl.DateTimeFormat().resolvedOptions().timeZone) || "local time";
  function local(root) {
    (root || document).querySelectorAll("time[data-ms]").forEach(function (t) {
      var ms = Number(t.getAttribute("data-ms"));
      if (!ms) return;
      var d = new Date(ms);
      t.setAttribute("datetime", d.toISOString());
      t.title = d.toISOString();
      t.textContent = d.toLocaleString() + " (" + zone + ")";
    });
  }
  document.addEventListener("DOMContentLoaded", function () { local(document); });
  document.addEventListener("htmx:afterSwap", function (e) { local(e.target); });
})();
