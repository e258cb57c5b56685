// Shared by the labeling page and the admin dashboard: DOM building (text only, never HTML), the API
// client (bearer key from sessionStorage, OpenAI-style errors turned into readable messages).
"use strict";

const IL = (() => {
  // Build an element; children are nodes or strings (strings become text nodes: model text is never HTML).
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "text") node.textContent = value;
      else if (name === "class") node.className = value;
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else if (name === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
    return node;
  }

  function newKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // One API client per page; `storageName` keeps the labeler key and the admin key apart.
  function client(storageName) {
    return {
      get key() { return sessionStorage.getItem(storageName); },
      set key(value) {
        if (value) sessionStorage.setItem(storageName, value);
        else sessionStorage.removeItem(storageName);
      },
      async call(method, path, body, headers) {
        const init = { method, headers: { Authorization: `Bearer ${this.key || ""}`, ...(headers || {}) } };
        if (body !== undefined) {
          init.headers["Content-Type"] = "application/json";
          init.body = JSON.stringify(body);
        }
        let response;
        try {
          response = await fetch(path, init);
        } catch (err) {
          throw new ApiError(0, "The gateway cannot be reached; check the connection and try again.", "network");
        }
        const text = await response.text();
        let payload = null;
        try { payload = text ? JSON.parse(text) : null; } catch (err) { payload = null; }
        if (!response.ok) {
          const error = payload && payload.error ? payload.error : {};
          let message = error.message || `The gateway answered ${response.status}.`;
          if (response.status === 401) message = `That key was not accepted: ${message}`;
          const retry = response.headers.get("Retry-After");
          if (retry) message += ` (retry in ${retry} s)`;
          throw new ApiError(response.status, message, error.code);
        }
        return payload;
      },
    };
  }

  function formatTime(seconds) {
    const d = new Date(seconds * 1000);
    return d.toISOString().replace("T", " ").slice(0, 16) + " UTC";
  }

  return { el, clear, newKey, client, ApiError, formatTime };
})();
