// jobworker console: refreshes each [data-live] region from its server-rendered fragment,
// follows the job log by offset, and sends the page's actions with the session's CSRF token.
"use strict";

const REFRESH_MS = 2000;

function csrfToken() {
  const meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.content : "";
}

function say(text, bad) {
  const box = document.getElementById("message");
  if (!box) return;
  box.textContent = text;
  box.hidden = !text;
  box.classList.toggle("bad", Boolean(bad));
}

async function refreshRegion(region) {
  const response = await fetch(region.dataset.live, { credentials: "same-origin" });
  if (response.redirected || response.status === 401) {
    window.location.assign("/ui/login");
    return;
  }
  if (response.ok) region.innerHTML = await response.text();
}

async function followLog(pre) {
  const url = `${pre.dataset.logUrl}?offset=${pre.dataset.offset}`;
  const response = await fetch(url, { credentials: "same-origin" });
  if (!response.ok) return;
  const body = await response.json();
  if (!body.text) return;
  const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
  pre.append(body.text);
  pre.dataset.offset = String(body.next_offset);
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function tick() {
  if (document.hidden) return; // paused while the tab is hidden
  const work = [...document.querySelectorAll("[data-live]")].map(refreshRegion);
  const log = document.getElementById("log");
  if (log) work.push(followLog(log));
  await Promise.allSettled(work);
}

async function act(button) {
  if (button.dataset.confirm && !window.confirm(button.dataset.confirm)) return;
  button.disabled = true;
  try {
    const response = await fetch(button.dataset.url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "X-CSRF-Token": csrfToken() },
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      say(`${response.status}: ${body.detail || response.statusText}`, true);
      return;
    }
    say(`${button.textContent.trim()}: done`, false);
    if (button.dataset.then) window.location.assign(button.dataset.then);
    else await tick();
  } finally {
    button.disabled = false;
  }
}

async function logIn(form) {
  const token = form.elements.token.value;
  const response = await fetch("/ui/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
  const body = await response.json().catch(() => ({}));
  if (response.ok) window.location.assign(body.path);
  else say(body.detail || "that token is not valid", true);
}

document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-action]");
  if (button) {
    event.preventDefault();
    act(button);
  }
});

document.addEventListener("submit", (event) => {
  if (event.target.id === "login") {
    event.preventDefault();
    logIn(event.target);
  }
});

document.addEventListener("visibilitychange", () => {
  if (!document.hidden) tick();
});

setInterval(tick, REFRESH_MS);
