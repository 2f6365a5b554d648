// sharded-broker dashboard: live refresh of the page's #live region, and the actions.
// Actions are POSTs with a JSON body and the token in the X-Dashboard-Token header; the
// token comes from the URL fragment (#token=..., never sent to the server) or the token bar,
// and is kept in this tab's sessionStorage only.
(function () {
  "use strict";
  var body = document.body;
  var readOnly = body.dataset.readOnly === "true";
  var refreshMs = parseFloat(body.dataset.refresh || "2") * 1000;
  var live = document.getElementById("live");
  var statusBox = document.getElementById("status");
  var liveState = document.getElementById("live-state");
  var TOKEN_KEY = "sharded-broker-dashboard-token";

  function takeTokenFromFragment() {
    var match = /(?:^#|&)token=([^&]+)/.exec(location.hash);
    if (match) {
      sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(match[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
  }

  function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

  function showTokenBar() {
    var bar = document.getElementById("token-bar");
    if (!bar) return;
    bar.hidden = !!token();
    document.getElementById("token-save").addEventListener("click", function () {
      var value = document.getElementById("token-input").value.trim();
      if (value) { sessionStorage.setItem(TOKEN_KEY, value); bar.hidden = true; say("token set", "ok"); }
    });
  }

  function say(text, kind) {
    statusBox.textContent = "";
    var line = document.createElement("span");
    line.className = kind || "";
    line.textContent = text;
    statusBox.appendChild(line);
  }

  function editing() {
    var active = document.activeElement;
    return active && active.tagName === "INPUT" && live.contains(active);
  }

  function refresh() {
    if (editing()) return Promise.resolve();
    var address = location.pathname + (location.search ? location.search + "&" : "?") + "partial=1";
    return fetch(address, { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        if (!editing()) live.innerHTML = html;
        liveState.textContent = "live · " + new Date().toLocaleTimeString();
        liveState.classList.remove("stale");
      })
      .catch(function (error) {
        liveState.textContent = "not updating: " + error.message;
        liveState.classList.add("stale");
      });
  }

  function post(path, payload) {
    return fetch(path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Dashboard-Token": token() },
      body: JSON.stringify(payload),
      credentials: "same-origin",
    }).then(function (response) {
      return response.json().catch(function () { return { error: "HTTP " + response.status }; })
        .then(function (answer) {
          if (!response.ok) throw new Error(answer.error || ("HTTP " + response.status));
          return answer;
        });
    });
  }

  function watchJob(id) {
    var bar = document.createElement("progress");
    var label = document.createElement("span");
    statusBox.textContent = "";
    statusBox.appendChild(label);
    statusBox.appendChild(bar);
    function poll() {
      fetch("/api/jobs/" + encodeURIComponent(id), { cache: "no-store" })
        .then(function (r) { return r.json(); })
        .then(function (job) {
          bar.max = Math.max(job.total, 1);
          bar.value = job.done;
          label.textContent = "replaying: " + job.done.toLocaleString() + " of " + job.total.toLocaleString() + " ";
          if (job.error) { say("replay failed: " + job.error, "error"); return; }
          if (job.finished) { say("replayed " + job.done.toLocaleString() + " dead letters", "ok"); refresh(); return; }
          setTimeout(poll, 300);
        });
    }
    poll();
  }

  var handlers = {
    "pause": function (d) {
      var payload = { queue: d.queue, paused: d.paused === "true" };
      if (d.key !== undefined) payload.key = d.key;
      return post("/api/pause", payload).then(function () {
        return (payload.paused ? "paused " : "resumed ") + (d.key !== undefined ? "key " + d.key : "queue " + d.queue);
      });
    },
    "interval": function (d, button) {
      var input = button.closest("form").querySelector("input[name=seconds]");
      var seconds = input.value.trim() === "" ? null : parseFloat(input.value);
      return post("/api/interval", { queue: d.queue, key: d.key, seconds: seconds }).then(function () {
        return seconds === null ? "interval back to the queue default" : "interval set to " + seconds + " s";
      });
    },
    "release": function (d) {
      return post("/api/release", { queue: d.queue, key: d.key, message_id: d.id, token: d.token, batch_id: d.batch }).then(function () {
        return "lease of " + d.id + " released";
      });
    },
    "replay": function (d) {
      return post("/api/replay", { queue: d.queue, ids: [d.id] }).then(function (a) {
        return "replayed " + a.replayed + " message";
      });
    },
    "replay-all": function (d) {
      return post("/api/replay", { queue: d.queue, position: d.position || "tail" }).then(function (a) {
        watchJob(a.job);
        return null;
      });
    },
    "purge": function (d) {
      return post("/api/purge", { queue: d.queue }).then(function (a) {
        return "purged " + a.purged.toLocaleString() + " dead letters";
      });
    },
  };

  document.addEventListener("click", function (event) {
    var button = event.target.closest("button[data-action]");
    if (!button || readOnly) return;
    var handler = handlers[button.dataset.action];
    if (!handler) return;
    if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
    if (!token()) { say("enter the dashboard's token first (printed when it started)", "error"); showTokenBar(); return; }
    button.disabled = true;
    handler(button.dataset, button)
      .then(function (message) { if (message) say(message, "ok"); return refresh(); })
      .catch(function (error) { say("refused: " + error.message, "error"); })
      .then(function () { button.disabled = false; });
  });

  takeTokenFromFragment();
  if (!readOnly) showTokenBar();
  setInterval(refresh, refreshMs);
})();
