// Short polling: the page asks again every `periodMs`, never while the last
// request is still out, and not at all while the tab is hidden. (Why not
// server-sent events: EventSource cannot send an Authorization header, and
// the measured cost of a poll is small; README, "Dashboard".)

export function every(periodMs, fn) {
  let timer = null;
  let stopped = false;
  async function tick() {
    timer = null;
    if (stopped) return;
    if (!document.hidden) {
      try { await fn(); } catch { /* the page shows its own error state */ }
    }
    if (!stopped) timer = setTimeout(tick, periodMs);
  }
  const onVisible = () => { if (!document.hidden && timer !== null) { clearTimeout(timer); tick(); } };
  document.addEventListener("visibilitychange", onVisible);
  timer = setTimeout(tick, periodMs);
  return () => {
    stopped = true;
    if (timer !== null) clearTimeout(timer);
    document.removeEventListener("visibilitychange", onVisible);
  };
}
