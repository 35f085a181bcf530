// Render the plots of a `dvc plots show/diff --html-template tools/dvc_plots/offline.html` page with
// only the libraries inlined in that page, no network: node tools/dvc_plots/check_offline.js index.html
// Prints one JSON line {plots: [{id, marks, svg_bytes}]}; exits 1 naming the file when a plot does not render.
"use strict";
const fs = require("fs");
const vm = require("vm");

const file = process.argv[2];
if (!file) {
  console.error("usage: node check_offline.js PAGE.html");
  process.exit(2);
}
const html = fs.readFileSync(file, "utf8");
const scripts = [...html.matchAll(/<script([^>]*)>([\s\S]*?)<\/script>/g)];
const remote = scripts.filter((m) => /\bsrc\s*=/.test(m[1]));
if (remote.length) {
  console.error(`${file}: scripts loaded from elsewhere: ${remote.map((m) => m[1].trim()).join(", ")}`);
  process.exit(1);
}
const embeds = [];
const record = (target, spec) => embeds.push({ id: String(target).replace(/^#/, ""), spec });
const context = {
  console, setTimeout, clearTimeout, setInterval, clearInterval, queueMicrotask, structuredClone,
  URL, TextEncoder, TextDecoder, performance,
  fetch: () => Promise.reject(new Error("network is off")),
};
context.globalThis = context;                             // no window: vega runs headless, as in node
vm.createContext(context);
const libs = scripts.filter((m) => !m[2].includes("vegaEmbed("));
const calls = scripts.filter((m) => m[2].includes("vegaEmbed("));
function run(code, what) {
  try {
    vm.runInContext(code, context, { filename: file });
  } catch (err) {
    console.error(`${file}: ${what} failed: ${err && err.message ? err.message : err}`);
    process.exit(1);
  }
}
libs.forEach((m, i) => run(m[2], `inlined script ${i + 1}`));
if (typeof context.vegaEmbed !== "function") {
  console.error(`${file}: vega-embed is not inlined in the page`);
  process.exit(1);
}
context.vegaEmbed = record;                               // the plot scripts' calls are recorded, then rendered
calls.forEach((m, i) => {
  run(m[2], `plot script ${i + 1}`);
});
if (!context.vega || !context.vegaLite) {
  console.error(`${file}: vega / vega-lite are not inlined in the page`);
  process.exit(1);
}
if (!embeds.length) {
  console.error(`${file}: no vegaEmbed(...) plot calls found`);
  process.exit(1);
}
(async () => {
  const out = [];
  for (const { id, spec } of embeds) {
    const compiled = spec.$schema && spec.$schema.includes("vega-lite") ? context.vegaLite.compile(spec).spec : spec;
    const view = new context.vega.View(context.vega.parse(compiled), { renderer: "none" });
    const svg = await view.toSVG();
    const marks = (svg.match(/<path|<line|<rect/g) || []).length;
    if (!marks) {
      console.error(`${file}: plot ${id} rendered no marks`);
      process.exit(1);
    }
    out.push({ id, marks, svg_bytes: svg.length });
  }
  console.log(JSON.stringify({ plots: out }));
})().catch((err) => {
  console.error(`${file}: rendering failed: ${err && err.message ? err.message : err}`);
  process.exit(1);
});
