// The labeling page: sign in with a labeler key, then rank K responses, compare two versions blind, or
// write a demonstration. Keyboard first; drag works too (pointer events, so touch screens can drag).
// Every model text is set with textContent: it is shown, never parsed as HTML.
"use strict";

(() => {
  const { el, clear, newKey, client } = IL;
  const api = client("instructloop-labeler-key");
  const $ = (id) => document.getElementById(id);
  const FLAG_KEYS = { i: "fails_instruction", h: "harmful", m: "made_up_facts" };
  const FLAG_NAMES = { fails_instruction: "fails the instruction", harmful: "harmful", made_up_facts: "made-up facts" };
  const LETTERS = "123456789";

  const state = {
    me: null,
    mode: "rank",
    task: null,
    groups: [],        // ranking: best-first groups of slots
    history: [],       // previous `groups` for undo
    tieNext: false,    // the next placement joins the last group
    focus: 0,          // selected response (flags)
    flags: {},         // slot -> Set of flag names
    preferred: null,   // compare: left | right | tie
    submitKey: null,   // Idempotency-Key of this task's answer (a retry reuses it)
    busy: false,
  };

  // ---- messages -------------------------------------------------------------------------------------
  function status(text) { $("status").textContent = text || ""; }
  function error(text) { $("error").textContent = text || ""; }

  // ---- sign in ----------------------------------------------------------------------------------------
  async function signIn(key) {
    $("signin-error").textContent = "";
    api.key = key;
    try {
      const me = await api.call("GET", "/v1/label/me");
      if (me.role === "admin") {
        api.key = null;
        $("signin-error").textContent = "That is an admin key. This page only takes a labeler key; the admin " +
          "dashboard is at /label/admin.";
        return;
      }
      state.me = me;
    } catch (err) {
      api.key = null;
      $("signin-error").textContent = err.message;
      return;
    }
    renderMe();
    $("signin").hidden = true;
    $("work").hidden = false;
    $("modes").hidden = false;
    $("signout").hidden = false;
    $("who").textContent = `${state.me.name} · ${state.me.role}`;
    setMode("rank");
  }

  // The labeler's own counts, the admin's guidelines, and an exclusion notice (from GET /v1/label/me).
  function renderMe() {
    const me = state.me;
    const c = me.counts;
    const plural = (n, word) => `${n} ${word}${n === 1 ? "" : "s"}`;
    $("progress").textContent = `Your work: ${plural(c.rankings, "ranking")} · ` +
      `${plural(c.comparisons, "comparison")} · ${plural(c.demonstrations, "demonstration")}`;
    $("guidelines").textContent = me.guidelines;
    $("guidelines-box").hidden = !me.guidelines;
    $("excluded").hidden = !me.excluded;
  }

  async function refreshMe() {
    try {
      state.me = await api.call("GET", "/v1/label/me");
      renderMe();
    } catch (err) { /* the counts wait for the next answer */ }
  }

  function signOut() {
    api.key = null;
    window.location.reload();
  }

  // ---- tasks ------------------------------------------------------------------------------------------
  function setMode(mode) {
    state.mode = mode;
    for (const button of document.querySelectorAll("#modes button")) {
      button.setAttribute("aria-pressed", String(button.dataset.mode === mode));
    }
    loadTask();
  }

  function resetAnswer() {
    state.groups = [];
    state.history = [];
    state.tieNext = false;
    state.focus = 0;
    state.flags = {};
    state.preferred = null;
    state.submitKey = newKey();
    $("rationale").value = "";
    $("demonstration").value = "";
  }

  let loading = 0;  // only the newest request may set the task (a mode switch while one is in flight)

  async function loadTask() {
    const mine = ++loading;
    state.task = null;
    resetAnswer();
    render();
    error("");
    status("Asking the policy for a task…");
    try {
      const task = await api.call("POST", "/v1/label/tasks", { mode: state.mode });
      if (mine !== loading) return;
      state.task = task;
      status(task.overlap ? "This task is also ranked by another labeler (agreement check)." : "");
    } catch (err) {
      if (mine !== loading) return;
      status("");
      error(err.message);
    }
    render();
    if (state.task && state.mode === "demonstration") $("demonstration").focus();
  }

  function answerBody() {
    const rationale = $("rationale").value.trim() || null;
    if (state.mode === "rank") {
      const flags = {};
      for (const [slot, names] of Object.entries(state.flags)) if (names.size) flags[slot] = [...names];
      return ["ranking", { ranking: state.groups, rationale, flags }];
    }
    if (state.mode === "compare") return ["comparison", { preferred: state.preferred, rationale }];
    return ["demonstration", { response: $("demonstration").value }];
  }

  function ready() {
    if (!state.task) return "There is no task to submit.";
    if (state.mode === "rank") {
      const placed = state.groups.flat().length;
      if (placed < state.task.responses.length) {
        return `Place every response first (${placed} of ${state.task.responses.length} placed).`;
      }
    } else if (state.mode === "compare") {
      if (!state.preferred) return "Choose left (1), right (2) or tie (t) first.";
    } else if (!$("demonstration").value.trim()) {
      return "Write the answer first.";
    }
    return null;
  }

  async function submit() {
    if (state.busy) return;
    const problem = ready();
    if (problem) { error(problem); return; }
    const [kind, body] = answerBody();
    state.busy = true;
    error("");
    status("Sending…");
    try {
      const result = await api.call("POST", `/v1/label/tasks/${state.task.task_id}/${kind}`, body,
                                    { "Idempotency-Key": state.submitKey });
      let text = `Recorded (${result.id.slice(0, 8)}).`;
      if (result.agreement !== null && result.agreement !== undefined) {
        text += ` Agreement with the other labeler: ${Math.round(result.agreement * 100)} %.`;
      }
      state.busy = false;
      await Promise.all([loadTask(), refreshMe()]);
      status(text);
    } catch (err) {
      state.busy = false;
      status("");
      error(err.message);  // the answer stays on screen; submitting again reuses the same Idempotency-Key
    }
  }

  async function skip() {
    if (!state.task || state.busy) return;
    try {
      await api.call("POST", `/v1/label/tasks/${state.task.task_id}/skip`);
    } catch (err) {
      error(err.message);
      return;
    }
    await loadTask();
    status("Skipped.");
  }

  // ---- ranking ----------------------------------------------------------------------------------------
  function placed(slot) { return state.groups.some((group) => group.includes(slot)); }

  function remember() { state.history.push(state.groups.map((group) => [...group])); }

  function place(slot, tie) {
    if (!state.task || slot < 0 || slot >= state.task.responses.length) return;
    remember();
    state.groups = state.groups.map((group) => group.filter((s) => s !== slot)).filter((group) => group.length);
    if (tie && state.groups.length) state.groups[state.groups.length - 1].push(slot);
    else state.groups.push([slot]);
    state.tieNext = false;
    error("");
    render();
  }

  function placeAt(slot, target) {
    // target: {group: i} joins rank i, {insert: i} makes a new rank at position i
    remember();
    let groups = state.groups.map((group) => group.filter((s) => s !== slot));
    let index = target.group !== undefined ? target.group : target.insert;
    // removing the slot may empty a group before the target: keep the index pointing at the same place
    const emptied = groups.slice(0, index).filter((group) => !group.length).length;
    groups = groups.filter((group, i) => group.length || (target.group !== undefined && i === target.group));
    index -= emptied;
    if (target.group !== undefined && groups[index]) groups[index].push(slot);
    else groups.splice(Math.max(0, Math.min(index, groups.length)), 0, [slot]);
    state.groups = groups.filter((group) => group.length);
    render();
  }

  function undo() {
    if (!state.history.length) return;
    state.groups = state.history.pop();
    state.tieNext = false;
    render();
  }

  function toggleFlag(slot, name) {
    const names = state.flags[slot] || (state.flags[slot] = new Set());
    if (names.has(name)) names.delete(name); else names.add(name);
    render();
  }

  // ---- drag (pointer events) --------------------------------------------------------------------------
  let drag = null;

  function startDrag(event, slot) {
    if (event.button !== 0) return;
    event.preventDefault();
    const ghost = el("div", { class: "ghost", text: `Response ${LETTERS[slot]}` });
    document.body.append(ghost);
    drag = { slot, ghost };
    moveDrag(event);
    document.addEventListener("pointermove", moveDrag);
    document.addEventListener("pointerup", endDrag, { once: true });
  }

  function moveDrag(event) {
    if (!drag) return;
    drag.ghost.style.left = `${event.clientX + 8}px`;
    drag.ghost.style.top = `${event.clientY + 8}px`;
    for (const zone of document.querySelectorAll(".drop-active")) zone.classList.remove("drop-active");
    const zone = dropZoneAt(event.clientX, event.clientY);
    if (zone) zone.classList.add("drop-active");
  }

  function dropZoneAt(x, y) {
    const hit = document.elementFromPoint(x, y);
    return hit ? hit.closest("[data-drop]") : null;
  }

  function endDrag(event) {
    document.removeEventListener("pointermove", moveDrag);
    if (!drag) return;
    const { slot, ghost } = drag;
    drag = null;
    ghost.remove();
    const zone = dropZoneAt(event.clientX, event.clientY);
    if (!zone) { render(); return; }
    const [kind, index] = zone.dataset.drop.split(":");
    placeAt(slot, kind === "group" ? { group: Number(index) } : { insert: Number(index) });
  }

  // ---- rendering --------------------------------------------------------------------------------------
  function render() {
    const task = state.task;
    $("prompt-box").hidden = !task;
    $("rank-view").hidden = !(task && state.mode === "rank");
    $("compare-view").hidden = !(task && state.mode === "compare");
    $("demo-view").hidden = !(task && state.mode === "demonstration");
    $("rationale-box").hidden = !(task && state.mode !== "demonstration");
    $("undo").hidden = state.mode !== "rank";
    $("work").dataset.taskId = task ? task.task_id : "";
    if (!task) return;
    // A chat prompt is shown as its messages (role, content), never as the chat template's markup.
    const chat = Array.isArray(task.messages) && task.messages.length > 0;
    $("prompt").hidden = chat;
    $("messages").hidden = !chat;
    $("prompt").textContent = chat ? "" : task.prompt;
    clear($("messages"));
    if (chat) {
      for (const message of task.messages) {
        $("messages").append(el("li", { class: `message role-${message.role}` },
          el("span", { class: "role", text: message.role }),
          el("pre", { class: "content", text: message.content })));
      }
    }
    $("task-meta").textContent = `${task.source === "live" ? "from live traffic" : "from the prompt set"}`;
    if (state.mode === "rank") renderRank(task);
    if (state.mode === "compare") renderCompare(task);
  }

  function renderRank(task) {
    const list = clear($("responses"));
    task.responses.forEach((item, slot) => {
      const group = state.groups.findIndex((g) => g.includes(slot));
      const flags = state.flags[slot] || new Set();
      const card = el("li", {
        class: `response${slot === state.focus ? " focused" : ""}${group >= 0 ? " placed" : ""}`,
        dataset: { slot: String(slot) },
        onclick: () => { state.focus = slot; render(); },
      },
      el("div", { class: "response-head" },
        el("span", { class: "handle", title: "Drag onto a rank", "aria-hidden": "true", text: "⠿",
                     onpointerdown: (event) => startDrag(event, slot) }),
        el("span", { class: "label", text: `Response ${LETTERS[slot]}` }),
        el("span", { class: "rank-badge", text: group >= 0 ? `rank ${group + 1}` : "not placed" })),
      el("pre", { class: "text", text: item.text }),
      el("div", { class: "flags" },
        Object.entries(FLAG_NAMES).map(([name, label]) => el("label", { class: "flag" },
          el("input", { type: "checkbox", checked: flags.has(name), dataset: { flag: name },
                        onchange: () => toggleFlag(slot, name) }),
          label))));
      list.append(card);
    });
    const ranking = clear($("ranking"));
    const insert = (index) => el("li", { class: "insert", dataset: { drop: `insert:${index}` }, text: "new rank here" });
    state.groups.forEach((group, index) => {
      ranking.append(insert(index));
      ranking.append(el("li", { class: "group", dataset: { drop: `group:${index}` } },
        el("span", { class: "place", text: `${index + 1}.` }),
        group.map((slot) => el("span", { class: "chip", text: LETTERS[slot],
                                         onpointerdown: (event) => startDrag(event, slot) })),
        group.length > 1 ? el("span", { class: "meta", text: "tied" }) : null));
    });
    ranking.append(insert(state.groups.length));
    if (state.tieNext) ranking.append(el("li", { class: "tie-mode", text: "tie: the next response joins the last rank" }));
  }

  function renderCompare(task) {
    const [left, right] = task.responses;
    document.querySelector("#side-left .text").textContent = left ? left.text : "";
    document.querySelector("#side-right .text").textContent = right ? right.text : "";
    $("side-left").classList.toggle("chosen", state.preferred === "left");
    $("side-right").classList.toggle("chosen", state.preferred === "right");
    const labels = { left: "Left is better", right: "Right is better", tie: "Tie" };
    $("compare-choice").textContent = state.preferred ? `${labels[state.preferred]} — Enter to submit` : "";
  }

  // ---- keyboard ---------------------------------------------------------------------------------------
  function typing(target) {
    return target && (target.tagName === "TEXTAREA" || (target.tagName === "INPUT" && target.type !== "checkbox"));
  }

  function onKey(event) {
    if (!state.me) return;
    if (typing(event.target)) {
      if (event.key === "Escape") event.target.blur();
      else if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); submit(); }
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const key = event.key;
    if (key === "R" || key === "C" || key === "D") {
      setMode({ R: "rank", C: "compare", D: "demonstration" }[key]);
    } else if (key === "?") {
      $("help").hidden = !$("help").hidden;
    } else if (key === "Enter") {
      event.preventDefault();
      submit();
    } else if (key === "s") {
      skip();
    } else if (key === "r" && state.mode !== "demonstration") {
      event.preventDefault();
      $("rationale").focus();
    } else if (state.mode === "rank") {
      onRankKey(event);
    } else if (state.mode === "compare") {
      const choice = { 1: "left", ArrowLeft: "left", 2: "right", ArrowRight: "right", t: "tie", "=": "tie" }[key];
      if (choice) { state.preferred = choice; render(); }
    } else if (state.mode === "demonstration" && key === "w") {
      event.preventDefault();
      $("demonstration").focus();
    }
  }

  function onRankKey(event) {
    const key = event.key;
    const n = state.task ? state.task.responses.length : 0;
    const digit = LETTERS.indexOf(key);
    if (digit >= 0 && digit < n) {
      if (placed(digit)) { error(`Response ${key} is already placed; u undoes.`); return; }
      place(digit, state.tieNext);
    } else if (key === "t") {
      state.tieNext = state.groups.length > 0;
      if (!state.tieNext) error("Place a response first; t ties the next one with it.");
      render();
    } else if (key === "u" || key === "Backspace") {
      event.preventDefault();
      undo();
    } else if (key === "j" || key === "ArrowDown") {
      event.preventDefault();
      state.focus = Math.min(n - 1, state.focus + 1);
      render();
    } else if (key === "k" || key === "ArrowUp") {
      event.preventDefault();
      state.focus = Math.max(0, state.focus - 1);
      render();
    } else if (FLAG_KEYS[key] && n) {
      toggleFlag(state.focus, FLAG_KEYS[key]);
    }
  }

  // ---- wiring -----------------------------------------------------------------------------------------
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("key").value.trim());
  });
  $("signout").addEventListener("click", signOut);
  $("submit").addEventListener("click", submit);
  $("skip").addEventListener("click", skip);
  $("undo").addEventListener("click", undo);
  $("help-button").addEventListener("click", () => { $("help").hidden = !$("help").hidden; });
  for (const button of document.querySelectorAll("#modes button")) {
    button.addEventListener("click", () => setMode(button.dataset.mode));
  }
  for (const [id, choice] of [["side-left", "left"], ["side-right", "right"]]) {
    $(id).addEventListener("click", () => { state.preferred = choice; render(); });
  }
  document.addEventListener("keydown", onKey);
  if (api.key) signIn(api.key);
})();
