// Small inline-SVG charts for the admin dashboard (nothing fetched, no library): line charts over time,
// a version timeline coloured by status, and stacked bars. Labels are text nodes, never markup.
"use strict";

const Charts = (() => {
  const NS = "http://www.w3.org/2000/svg";
  const W = 420, H = 180, PAD = { left: 40, right: 10, top: 10, bottom: 24 };

  function svg(tag, attrs, text) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function frame(label) {
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": label });
    root.append(svg("title", {}, label));
    return root;
  }

  function scales(xs, ys, yMin, yMax) {
    let x0 = Math.min(...xs), x1 = Math.max(...xs);
    if (x0 === x1) { x0 -= 30; x1 += 30; }
    let y0 = yMin !== undefined ? yMin : Math.min(...ys), y1 = yMax !== undefined ? yMax : Math.max(...ys);
    if (y0 === y1) { y0 -= 0.5; y1 += 0.5; }
    const sx = (x) => PAD.left + (x - x0) / (x1 - x0) * (W - PAD.left - PAD.right);
    const sy = (y) => H - PAD.bottom - (y - y0) / (y1 - y0) * (H - PAD.top - PAD.bottom);
    return { sx, sy, x0, x1, y0, y1 };
  }

  function axes(root, s) {
    root.append(svg("line", { x1: PAD.left, y1: H - PAD.bottom, x2: W - PAD.right, y2: H - PAD.bottom, class: "axis" }));
    root.append(svg("line", { x1: PAD.left, y1: PAD.top, x2: PAD.left, y2: H - PAD.bottom, class: "axis" }));
    for (const y of [s.y0, (s.y0 + s.y1) / 2, s.y1]) {
      root.append(svg("text", { x: PAD.left - 4, y: s.sy(y) + 3, "text-anchor": "end", class: "tick" }, fmt(y)));
    }
    for (const [x, anchor] of [[s.x0, "start"], [s.x1, "end"]]) {
      root.append(svg("text", { x: s.sx(x), y: H - 6, "text-anchor": anchor, class: "tick" }, clock(x)));
    }
  }

  function fmt(v) {
    if (Number.isInteger(v) || Math.abs(v) >= 100) return v.toFixed(0);
    return Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3);
  }
  function clock(t) { return new Date(t * 1000).toISOString().slice(11, 16); }

  function empty(container, text) {
    container.replaceChildren(Object.assign(document.createElement("p"), { className: "empty", textContent: text }));
  }

  function legend(items) {
    const box = document.createElement("div");
    box.className = "legend";
    for (const [cls, text] of items) box.append(Object.assign(document.createElement("span"), { className: cls, textContent: text }));
    return box;
  }

  // series: [{name, points: [[t, v], ...]}]
  function line(container, label, series, opts = {}) {
    const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
    if (!all.length) { empty(container, opts.empty || "No data yet."); return; }
    const root = frame(label);
    const s = scales(all.map((p) => p[0]), all.map((p) => p[1]), opts.yMin, opts.yMax);
    axes(root, s);
    if (opts.reference !== undefined) {
      root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: s.sy(opts.reference), y2: s.sy(opts.reference),
                                class: "axis", "stroke-dasharray": "4 3" }));
    }
    series.forEach((serie, i) => {
      const points = serie.points.filter((p) => Number.isFinite(p[1]));
      if (!points.length) return;
      root.append(svg("polyline", { class: `line s${i}`, fill: "none",
                                    points: points.map((p) => `${s.sx(p[0])},${s.sy(p[1])}`).join(" ") }));
      for (const p of points) {
        const dot = svg("circle", { cx: s.sx(p[0]), cy: s.sy(p[1]), r: 3, class: `s${i}` });
        dot.append(svg("title", {}, `${serie.name} ${p[2] || ""}: ${fmt(p[1])} at ${clock(p[0])}`));
        root.append(dot);
      }
    });
    container.replaceChildren(root, legend(series.map((serie, i) => [`k${i}`, serie.name])));
  }

  // events: [{time, version, status, reason}]: one row per version, a dot per status change.
  function timeline(container, label, events) {
    if (!events.length) { empty(container, "No version published yet."); return; }
    const versions = [...new Set(events.map((e) => e.version))];
    const root = frame(label);
    const rowH = Math.min(24, (H - PAD.top - PAD.bottom) / versions.length);
    const s = scales(events.map((e) => e.time), [0, 1]);
    axes(root, { ...s, y0: NaN, y1: NaN, sy: () => -100 });
    versions.forEach((version, row) => {
      const y = PAD.top + rowH * (row + 0.5);
      root.append(svg("text", { x: PAD.left - 4, y: y + 3, "text-anchor": "end", class: "tick" }, version.slice(-6)));
      const mine = events.filter((e) => e.version === version);
      if (mine.length > 1) {
        root.append(svg("line", { x1: s.sx(mine[0].time), x2: s.sx(mine[mine.length - 1].time), y1: y, y2: y, class: "axis" }));
      }
      for (const e of mine) {
        const dot = svg("circle", { cx: s.sx(e.time), cy: y, r: 5, class: `st-${e.status}` });
        dot.append(svg("title", {}, `${e.version} ${e.status} at ${clock(e.time)}${e.reason ? ": " + e.reason : ""}`));
        root.append(dot);
      }
    });
    const statuses = [...new Set(events.map((e) => e.status))];
    container.replaceChildren(root, legend(statuses.map((st) => [`st-${st}`, st.replace("_", " ")])));
  }

  // buckets: [{start, values: [a, b]}], names: ["comparisons", "demonstrations"]
  function bars(container, label, buckets, names) {
    if (!buckets.length) { empty(container, "No feedback yet."); return; }
    const totals = buckets.map((b) => b.values.reduce((x, y) => x + y, 0));
    const root = frame(label);
    const s = scales([buckets[0].start, buckets[buckets.length - 1].start], [0, Math.max(2, ...totals)], 0,
                     2 * Math.ceil(Math.max(2, ...totals) / 2));
    axes(root, s);
    const width = Math.max(2, (W - PAD.left - PAD.right) / buckets.length - 2);
    buckets.forEach((b, i) => {
      let base = 0;
      const x = PAD.left + i * (W - PAD.left - PAD.right) / buckets.length + 1;
      b.values.forEach((v, k) => {
        if (!v) return;
        const rect = svg("rect", { x, width, y: s.sy(base + v), height: s.sy(base) - s.sy(base + v), class: `bar${k}` });
        rect.append(svg("title", {}, `${names[k]}: ${v} from ${clock(b.start)}`));
        root.append(rect);
        base += v;
      });
    });
    container.replaceChildren(root, legend(names.map((n, k) => [`k${k}`, n])));
  }

  return { line, timeline, bars, empty };
})();
