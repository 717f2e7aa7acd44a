"""What makes a report page an inspection tool, in the page itself (no library but the 3D viewer, loaded from the
page's asset folder when a detail view first opens): filters and sorting of the part cards with their counts, and
the detail view of one part (its pictures at full size, the heatmap's colour bar, its cloud in 3D, previous and
next part from the keyboard).

The page gives the script its settings in ``<script id="m3dm-config" type="application/json">``: the viewer's and
the clouds' addresses and the heatmap's colour stops. A card (``figure.part``) carries what the script needs in
``data-`` attributes.
"""

DETAIL_VIEW = """
<div id="detail" class="detail" hidden role="dialog" aria-modal="true" aria-labelledby="detail-title">
<div class="detail-box">
<div class="detail-head">
<button type="button" id="detail-prev" title="previous part (left arrow)">&#9664; previous</button>
<button type="button" id="detail-next" title="next part (right arrow)">next &#9654;</button>
<button type="button" id="detail-close" title="close (Esc)">close &#10005;</button></div>
<h2 id="detail-title"></h2><p id="detail-info"></p>
<div class="detail-panels">
<figure class="panel"><img id="detail-rgb" alt="RGB" width="224" height="224"><figcaption>RGB</figcaption></figure>
<figure class="panel"><img id="detail-gt" alt="ground truth" width="224" height="224">
<figcaption id="detail-gt-caption">ground truth (red)</figcaption></figure>
<figure class="panel"><img id="detail-heat" alt="heatmap over the RGB" width="224" height="224">
<figcaption>heatmap over the RGB (ground truth outlined in white)
<div class="colourbar" aria-hidden="true"></div><div class="colourbar-labels"><span id="detail-low"></span>
<span>anomaly score</span><span id="detail-high"></span></div></figcaption></figure>
<figure class="panel view3d"><div id="detail-3d" class="cloud"></div>
<figcaption>point cloud in 3D (drag to turn, scroll to zoom), coloured by
<span class="modes"><button type="button" data-mode="score" aria-pressed="true">score</button>
<button type="button" data-mode="rgb" aria-pressed="false">RGB</button>
<button type="button" data-mode="gt" aria-pressed="false">ground truth</button></span>
<span id="detail-3d-note" class="note"></span></figcaption></figure>
</div>
<p id="detail-links" class="note"></p>
</div></div>
"""

SCRIPT = r"""
(function () {
"use strict";
const config = JSON.parse(document.getElementById("m3dm-config").textContent);
const cards = Array.from(document.querySelectorAll("figure.part"));
const form = document.getElementById("filters");
const detail = document.getElementById("detail");
const $ = (id) => document.getElementById(id);
let shown = cards.slice();
let current = null;
let mode = "score";
const clouds = {};
let viewer = "none";  // "loading", "ready", "failed"
const waiting = [];

function number(text) { const x = parseFloat(text); return Number.isFinite(x) ? x : null; }

function passes(card, f) {
  const d = card.dataset;
  if (f.cls && d.class !== f.cls) return false;
  if (f.defect && d.defect !== f.defect) return false;
  if (f.outcome === "wrong" && d.wrong !== "1") return false;
  if (f.outcome === "right" && !(d.wrong === "0" && d.verdict)) return false;
  if ((f.outcome === "pass" || f.outcome === "fail") && d.verdict !== f.outcome) return false;
  const score = parseFloat(d.score);
  if (f.low !== null && score < f.low) return false;
  if (f.high !== null && score > f.high) return false;
  return true;
}

const ORDERS = {
  rank: (a, b) => a.dataset.rank - b.dataset.rank,
  high: (a, b) => b.dataset.score - a.dataset.score,
  low: (a, b) => a.dataset.score - b.dataset.score,
  name: (a, b) => (a.dataset.name < b.dataset.name ? -1 : a.dataset.name > b.dataset.name ? 1 : 0),
};

function update() {
  if (!form) return;
  const f = { cls: form.elements.cls.value, defect: form.elements.defect.value,
              outcome: form.elements.outcome.value, low: number(form.elements.low.value),
              high: number(form.elements.high.value) };
  const order = ORDERS[form.elements.sort.value] || ORDERS.rank;
  for (const gallery of document.querySelectorAll(".gallery")) {
    const mine = Array.from(gallery.querySelectorAll("figure.part")).sort(order);
    let count = 0;
    for (const card of mine) {
      card.hidden = !passes(card, f);
      count += card.hidden ? 0 : 1;
      gallery.appendChild(card);
    }
    const section = gallery.closest("section");
    if (section) section.hidden = Boolean(f.cls) && section.dataset.class !== f.cls;
    const counter = gallery.parentElement.querySelector(".count");
    if (counter) counter.textContent = count + " of " + mine.length + " parts shown";
  }
  shown = Array.from(document.querySelectorAll("figure.part")).filter((c) => !c.hidden);
  $("filter-count").textContent = shown.length + " of " + cards.length + " parts shown";
}

function loadScript(src, failed) {
  const tag = document.createElement("script");
  tag.src = src;
  tag.onerror = failed;
  document.head.appendChild(tag);
  return tag;
}

function withViewer(then) {
  if (viewer === "ready") { then(); return; }
  if (viewer === "failed") return;
  waiting.push(then);
  if (viewer === "loading") return;
  viewer = "loading";
  const failed = () => { viewer = "failed"; $("detail-3d-note").textContent = " (the 3D viewer could not be loaded)"; };
  loadScript(config.viewer, failed).onload = () => { viewer = "ready"; waiting.splice(0).forEach((f) => f()); };
}

function bytes(text) {
  const raw = atob(text);
  const out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}

function halves(text) {  // little-endian IEEE half floats -> numbers
  const raw = bytes(text);
  const out = new Array(raw.length / 2);
  for (let i = 0; i < out.length; i++) {
    const h = raw[2 * i] | (raw[2 * i + 1] << 8);
    const exponent = (h >> 10) & 31, fraction = h & 1023, sign = h & 32768 ? -1 : 1;
    out[i] = exponent === 0 ? sign * fraction * Math.pow(2, -24)
      : exponent === 31 ? (fraction ? NaN : sign * Infinity)
      : sign * (1 + fraction / 1024) * Math.pow(2, exponent - 15);
  }
  return out;
}

window.m3dmCloud = function (key, packed) {
  const rgb = bytes(packed.rgb);
  const cloud = { x: halves(packed.x), y: halves(packed.y), z: halves(packed.z), s: halves(packed.s),
                  gt: Array.from(bytes(packed.gt)), rgb: [] };
  for (let i = 0; i < rgb.length; i += 3) cloud.rgb.push("rgb(" + rgb[i] + "," + rgb[i + 1] + "," + rgb[i + 2] + ")");
  clouds[key] = cloud;
  if (current && current.dataset.key === key) draw();
};

function colours(cloud) {
  if (mode === "rgb") return { color: cloud.rgb };
  if (mode === "gt") return { color: cloud.gt.map((g) => (g ? "#ff2828" : "#b4b4b4")) };
  const d = current.dataset;
  return { color: cloud.s, cmin: number(d.low), cmax: number(d.high), colorscale: config.stops, showscale: true,
           colorbar: { title: { text: "score" }, thickness: 12, len: 0.75, tickfont: { size: 11 } } };
}

function draw() {
  const cloud = current && clouds[current.dataset.key];
  if (!cloud || viewer !== "ready") return;
  const marker = Object.assign({ size: 2.2 }, colours(cloud));
  const trace = { type: "scatter3d", mode: "markers", x: cloud.x, y: cloud.y, z: cloud.z, marker: marker,
                  text: cloud.s.map((s) => "score " + s.toPrecision(4)), hoverinfo: "text" };
  const axis = { visible: false };
  const layout = { margin: { l: 0, r: 0, t: 0, b: 0 }, showlegend: false, uirevision: current.dataset.key,
                   scene: { aspectmode: "data", xaxis: axis, yaxis: axis, zaxis: axis,
                            camera: { eye: { x: 0, y: -1.1, z: 2.1 }, up: { x: 0, y: 1, z: 0 } } } };
  window.Plotly.react($("detail-3d"), [trace], layout, { displaylogo: false, responsive: true });
  $("detail-3d-note").textContent = " (" + cloud.s.length + " points)";
}

function show(card) {
  current = card;
  const d = card.dataset;
  $("detail-title").textContent = d.name;
  $("detail-info").innerHTML = "#" + d.rank + " of the class · " + card.querySelector(".facts-line").innerHTML;
  const has = d.detail === "1";
  for (const kind of ["rgb", "gt", "heat"]) {
    const img = $("detail-" + kind);
    img.hidden = !has;
    if (has) img.src = config.parts + d.key + "-" + kind + ".jpg";
  }
  $("detail-gt-caption").textContent = d.gt === "1" ? "ground truth (red)" : "ground truth: none for this part";
  $("detail-low").textContent = Number(d.low).toPrecision(3);
  $("detail-high").textContent = Number(d.high).toPrecision(3);
  const links = [];
  if (d.pred) links.push('<a href="' + d.pred + '">full-size picture (pred_maps)</a>');
  $("detail-links").innerHTML = links.join(" · ");
  $("detail-3d-note").textContent = has ? " (loading)" : " (no cloud saved by this run)";
  if (window.Plotly) window.Plotly.purge($("detail-3d"));
  if (!has) return;
  withViewer(() => { if (clouds[d.key]) draw(); else loadScript(config.parts + d.key + ".js"); });
}

function open(card) {
  detail.hidden = false;
  document.body.classList.add("inspecting");
  show(card);
  $("detail-close").focus();
}

function close() {
  detail.hidden = true;
  document.body.classList.remove("inspecting");
  if (current) current.focus();
}

function step(by) {
  if (!current || !shown.length) return;
  const at = shown.indexOf(current);
  show(shown[(at + by + shown.length) % shown.length]);
}

for (const card of cards) {
  card.addEventListener("click", () => open(card));
  card.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); open(card); }
  });
}
$("detail-close").addEventListener("click", close);
$("detail-prev").addEventListener("click", () => step(-1));
$("detail-next").addEventListener("click", () => step(1));
detail.addEventListener("click", (e) => { if (e.target === detail) close(); });
for (const button of document.querySelectorAll(".modes button")) {
  button.addEventListener("click", () => {
    mode = button.dataset.mode;
    for (const b of document.querySelectorAll(".modes button")) b.setAttribute("aria-pressed", String(b === button));
    draw();
  });
}
document.addEventListener("keydown", (e) => {
  if (detail.hidden) return;
  if (e.key === "Escape") close();
  else if (e.key === "ArrowRight" || e.key === "j") step(1);
  else if (e.key === "ArrowLeft" || e.key === "k") step(-1);
});
if (form) {
  form.addEventListener("input", update);
  form.addEventListener("reset", () => setTimeout(update, 0));
  update();
}
})();
"""
