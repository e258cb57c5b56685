// The admin dashboard: signs in with an admin key (kept apart from any labeler key), draws what the
// learner and the labelers did from GET /v1/admin/labeling, and changes the labeling settings.
"use strict";

(() => {
  const { el, clear, client, formatTime } = IL;
  const api = client("instructloop-admin-key");
  const $ = (id) => document.getElementById(id);
  let timer = null;

  async function signIn(key) {
    $("signin-error").textContent = "";
    api.key = key;
    try {
      await refresh();
    } catch (err) {
      api.key = null;
      $("signin-error").textContent = err.status === 403
        ? "That key is not an admin key. Labelers sign in at /label." : err.message;
      return;
    }
    $("signin").hidden = true;
    $("dashboard").hidden = false;
    $("refresh").hidden = false;
    $("signout").hidden = false;
    timer = setInterval(() => refresh().catch((err) => { $("error").textContent = err.message; }), 15000);
  }

  // One point per gated version: its first promoted/rejected event (a later rollback or pin repeats the
  // manifest's metrics, which are not a new measurement).
  function metricSeries(policies, name) {
    const seen = new Set();
    const points = [];
    for (const p of policies) {
      if (!["promoted", "rejected"].includes(p.status) || seen.has(p.version)) continue;
      seen.add(p.version);
      if (Number.isFinite(p.metrics[name])) points.push([p.time, p.metrics[name], p.version]);
    }
    return points;
  }

  async function refresh() {
    const data = await api.call("GET", "/v1/admin/labeling");
    $("error").textContent = "";
    $("status").textContent = `Current version: ${data.current || "base"} · updated ${formatTime(Date.now() / 1000)}`;
    const body = (id) => document.querySelector(`#${id} .body`);
    Charts.timeline(body("panel-versions"), "Versions over time", data.policies);
    Charts.line(body("panel-rm"), "RM held-out accuracy",
                [{ name: "held-out accuracy", points: metricSeries(data.policies, "rm_heldout_accuracy") }],
                { yMin: 0, yMax: 1, reference: 0.5, empty: "No gated version reports RM accuracy yet." });
    Charts.line(body("panel-reward"), "Held-out reward",
                [{ name: "candidate", points: metricSeries(data.policies, "candidate_reward_mean") },
                 { name: "incumbent", points: metricSeries(data.policies, "incumbent_reward_mean") }],
                { empty: "No gate decision yet." });
    Charts.line(body("panel-kl"), "KL to the reference",
                [{ name: "candidate KL", points: metricSeries(data.policies, "candidate_kl") }],
                { yMin: 0, empty: "No gate decision yet." });
    drawWinRates(body("panel-winrate"), data);
    Charts.bars(body("panel-volume"), "Feedback volume",
                data.volume.map((b) => ({ start: b.start, values: [b.comparisons, b.demonstrations] })),
                ["comparisons", "demonstrations"]);
    drawHistory(body("panel-history"), data.policies);
    drawLabelers(body("panel-labelers"), data.labelers);
    $("live-prompts").checked = data.config.live_prompts;
    const [a, b] = data.config.compare_versions || ["", ""];
    if (document.activeElement !== $("compare-a")) $("compare-a").value = a;
    if (document.activeElement !== $("compare-b")) $("compare-b").value = b;
    $("prompt-count").textContent = `${data.uploaded_prompts} uploaded`;
    if (document.activeElement !== $("guidelines")) $("guidelines").value = data.guidelines;
    return data;
  }

  function drawWinRates(container, data) {
    const gatePoints = metricSeries(data.policies, "live_win_rate");
    if (gatePoints.length) {
      Charts.line(container, "Live win-rate at the gate", [{ name: "live win-rate at the gate", points: gatePoints }],
                  { yMin: 0, yMax: 1, reference: 0.5 });
    } else {
      clear(container);
    }
    if (!data.live_win_rates.length) {
      if (!gatePoints.length) Charts.empty(container, "No A/B votes between two versions yet (compare mode).");
      return;
    }
    const rows = data.live_win_rates.map((r) => el("tr", {},
      el("td", { text: `${r.version} vs ${r.against}` }),
      el("td", { class: "num", text: r.win_rate === null ? "–" : `${Math.round(r.win_rate * 100)} %` }),
      el("td", { class: "num", text: `${r.wins} / ${r.losses} / ${r.ties}` })));
    container.append(el("table", {}, el("thead", {}, el("tr", {},
      el("th", { text: "pair" }), el("th", { text: "win-rate" }), el("th", { text: "wins / losses / ties" }))),
      el("tbody", {}, rows)));
  }

  function drawHistory(container, policies) {
    if (!policies.length) { Charts.empty(container, "No version published yet."); return; }
    const rows = [...policies].reverse().map((p) => el("tr", {},
      el("td", { text: formatTime(p.time) }),
      el("td", { text: p.version }),
      el("td", { class: `status-${p.status}`, text: p.status.replace("_", " ") }),
      el("td", { text: p.reason || "" })));
    clear(container).append(el("table", {}, el("thead", {}, el("tr", {},
      el("th", { text: "time" }), el("th", { text: "version" }), el("th", { text: "status" }), el("th", { text: "reason" }))),
      el("tbody", {}, rows)));
  }

  function drawLabelers(container, labelers) {
    if (!labelers.length) { Charts.empty(container, "Nobody has labeled yet."); return; }
    const pct = (v) => (v === null || v === undefined ? "–" : `${Math.round(v * 100)} %`);
    const rows = labelers.map((l) => el("tr", { dataset: { keyId: l.key_id } },
      el("td", { text: l.name || l.key_id }),
      ...[l.rankings, l.comparisons, l.demonstrations, l.skips, l.flagged, l.overlaps].map((v) => el("td", { class: "num", text: v })),
      el("td", { class: "num", text: `${pct(l.agreement)} (${l.agreement_pairs} pairs)` }),
      el("td", { class: l.excluded ? "excluded" : "", text: l.excluded ? "excluded" : "included" }),
      el("td", {}, el("button", {
        type: "button",
        class: "exclusion",
        text: l.excluded ? "Include again" : "Exclude",
        onclick: () => setExcluded(l, !l.excluded),
      }))));
    const head = ["labeler", "rankings", "A/B votes", "demonstrations", "skips", "flagged", "shared items", "agreement",
                  "data", ""];
    clear(container).append(el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", { text: h })))),
      el("tbody", {}, rows)));
  }

  async function setExcluded(labeler, excluded) {
    const who = labeler.name || labeler.key_id;
    if (excluded && !window.confirm(`Exclude ${who}? Their feedback will be refused, and none of their ` +
                                    "comparisons will train the reward model from its next update.")) return;
    try {
      const path = `/v1/admin/labeling/labelers/${encodeURIComponent(labeler.key_id)}/exclusion`;
      if (excluded) await api.call("PUT", path, {});
      else await api.call("DELETE", path);
      await refresh();
      $("status").textContent = excluded ? `${who} is excluded.` : `${who} is included again.`;
    } catch (err) { $("error").textContent = err.message; }
  }

  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("key").value.trim());
  });
  $("signout").addEventListener("click", () => { api.key = null; clearInterval(timer); window.location.reload(); });
  $("refresh").addEventListener("click", () => refresh().catch((err) => { $("error").textContent = err.message; }));
  $("config-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const a = $("compare-a").value.trim(), b = $("compare-b").value.trim();
    const body = { live_prompts: $("live-prompts").checked, compare_versions: a && b ? [a, b] : null };
    try {
      await api.call("PUT", "/v1/admin/labeling/config", body);
      $("status").textContent = "Settings saved.";
      await refresh();
    } catch (err) { $("error").textContent = err.message; }
  });
  $("guidelines-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api.call("PUT", "/v1/admin/labeling/guidelines", { text: $("guidelines").value });
      await refresh();
      $("status").textContent = "Guidelines saved.";
    } catch (err) { $("error").textContent = err.message; }
  });
  $("prompts-file").addEventListener("change", async () => {
    const file = $("prompts-file").files[0];
    if (file) $("prompts").value = await file.text();
  });
  $("prompts-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const prompts = $("prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
    if (!prompts.length) { $("error").textContent = "Write or pick at least one prompt."; return; }
    try {
      const result = await api.call("POST", "/v1/admin/labeling/prompts", { prompts });
      $("prompts").value = "";
      await refresh();
      $("status").textContent = `${result.added} prompts added (${result.total} in the set).`;
    } catch (err) { $("error").textContent = err.message; }
  });
  if (api.key) signIn(api.key);
})();
