// Apply the remembered (or the system's) colour theme before the first paint, so a dark-mode user
// never sees a white flash. app.js owns the toggle; this file only reads the same key.
(function () {
  "use strict";
  var stored = null;
  try { stored = localStorage.getItem("vlgate.theme"); } catch (e) { /* storage disabled */ }
  var dark = stored ? stored === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
})();
