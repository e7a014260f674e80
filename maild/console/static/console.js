// maild desk console: the one script. Optional: every page works without it.
// It keeps relative times ("5 min ago") current; the absolute time stays in the title.
"use strict";
(function () {
  function relative(then) {
    var seconds = Math.max(0, Math.floor((Date.now() - then.getTime()) / 1000));
    var units = [[86400, "d"], [3600, "h"], [60, "min"]];
    for (var i = 0; i < units.length; i++) {
      if (seconds >= units[i][0]) { return Math.floor(seconds / units[i][0]) + " " + units[i][1] + " ago"; }
    }
    return "just now";
  }
  function refresh() {
    var times = document.querySelectorAll("time[datetime]");
    for (var i = 0; i < times.length; i++) {
      var value = times[i].getAttribute("datetime");
      if (!value) { continue; }
      var then = new Date(/[zZ]|[+-]\d\d:\d\d$/.test(value) ? value : value + "Z");
      if (!isNaN(then.getTime())) { times[i].textContent = relative(then); }
    }
  }
  document.addEventListener("DOMContentLoaded", function () { refresh(); setInterval(refresh, 30000); });
})();
