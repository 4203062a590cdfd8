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
  // A change waits for a majority of peers (seconds when one is slow): say so meanwhile,
  // and do not let a second click send it twice.
  document.addEventListener("submit", function (e) {
    var form = e.target;
    if ((form.method || "").toLowerCase() !== "post") return;
    var button = e.submitter || form.querySelector("button[type=submit]");
    if (!button) return;
    if (button.name) {
      var keep = document.createElement("input");
      keep.type = "hidden"; keep.name = button.name; keep.value = button.value;
      form.appendChild(keep);
    }
    button.disabled = true;
    button.textContent = button.getAttribute("data-busy") || "Saving… (waiting for the peers)";
  });
  document.addEventListener("htmx:afterSwap", function (e) { local(e.target); });
})();
