// DOM building and number formatting. Text always goes in as text nodes
// (never innerHTML): a device id or an error message cannot become markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

export function num(value, digits = 0) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  return Number(value).toLocaleString("en-US", {
    minimumFractionDigits: digits, maximumFractionDigits: digits });
}

export function seconds(value) {
  if (value === null || value === undefined) return "–";
  if (value < 1) return `${num(value * 1000, 1)} ms`;
  if (value < 120) return `${num(value, 1)} s`;
  if (value < 7200) return `${num(value / 60, 1)} min`;
  return `${num(value / 3600, 1)} h`;
}

export function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = value, i = 0;
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return `${num(v, i ? 1 : 0)} ${units[i]}`;
}

export function when(unixOrIso) {
  if (unixOrIso === null || unixOrIso === undefined) return "–";
  const d = typeof unixOrIso === "number" ? new Date(unixOrIso * 1000) : new Date(unixOrIso);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

export function notAvailable(what, why) {
  return h("p", { class: "na", role: "status", "data-na": what },
    `Not available: ${what}. `, why);
}

export function card(label, value, field, cls = "") {
  return h("div", { class: `card ${cls}` },
    h("dt", {}, label), h("dd", { "data-field": field }, value));
}
