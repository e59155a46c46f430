// clipstyle serve: the page. Form fields come from /api/config (clipstyle's Settings),
// progress from /api/events (server-sent events), images by URL from the server itself.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADERS = { "X-Clipstyle": "1" };
let config = null;
let upload = null;          // the current photo or film: {id, name, width, height, film}
let mask = null;            // the mask image of the region controls: {id, name, width, height}
let styles = [];            // style images: {id, name, weight} (weight as typed; used in a blend)
let shownPreview = "";      // the live image's current URL
let galleryKey = "";        // what the gallery shows, to redraw only on change
const reported = new Set(); // failed jobs whose error was shown

function say(text) { $("message").textContent = text || ""; }

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

async function api(method, url, body, headers = {}) {
  const response = await fetch(url, { method, body, headers: { ...HEADERS, ...headers } });
  let data = {};
  try { data = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

// --- the form ------------------------------------------------------------------------------------

function buildForm() {
  for (const name of Object.keys(config.presets)) $("preset").append(el("option", { value: name, textContent: name }));
  for (const f of config.fields) {
    let input;
    if (f.choices) {
      input = el("select");
      for (const c of f.choices) input.append(el("option", { value: c, textContent: c }));
    } else if (f.type === "str") {
      input = el("input", { type: "text" });
    } else {
      input = el("input", { type: "number", step: f.type === "int" ? "1" : "any" });
    }
    input.id = "f-" + f.name;
    input.name = f.name;
    if (f.help) input.title = f.help;
    $("fields").append(el("label", { htmlFor: input.id, title: f.help || "" }, f.name.replaceAll("_", " "), input));
  }
  $("seed").value = config.seed;
  const help = config.region.help;
  for (const [name, id] of [["where", "where"], ["mask", "mask"], ["invert_mask", "invert-mask"],
                            ["feather", "feather"], ["preserve_color", "preserve-color"]]) {
    if (help[name]) $(id).title = help[name];
  }
  $("feather").max = config.region.max_feather;
  const targetHelp = config.targets.help;
  for (const [name, id] of [["style_images", "style-images"], ["blend", "blend"], ["avoid", "avoid"], ["avoid_weight", "avoid-weight"]]) {
    if (targetHelp[name]) $(id).title = targetHelp[name];
  }
  setTargets(null);
  setRegion(null);
  if (!config.films.available) $("film-hint").textContent = `(films: ${config.films.hint})`;
  applyPreset("paper");
  $("preset").addEventListener("change", () => applyPreset($("preset").value));
}

function applyPreset(name) {
  $("preset").value = name;
  const values = config.presets[name] || {};
  for (const f of config.fields) $("f-" + f.name).value = f.name in values ? values[f.name] : f.default;
}

function formValues() {
  const form = { preset: $("preset").value, seed: $("seed").value };
  for (const f of config.fields) form[f.name] = $("f-" + f.name).value;
  Object.assign(form, regionForm());
  // the targets, as `clipstyle run --style-image/--blend/--avoid/--avoid-weight`
  form.style_images = styles.map((s) => ({ upload: s.id, weight: s.weight }));
  form.blend = $("blend").checked;
  form.avoid = $("avoid").value.split("\n").map((a) => a.trim()).filter(Boolean);
  form.avoid_weight = $("avoid-weight").value;
  return form;
}

// a finished job's style onto the photo in the form, within its region; a film restyled whole (and said so)
function applyStyle(jobId) {
  if (!upload) return say("choose a photo first");
  const region = regionForm();
  const asked = region.where.trim() || region.mask || region.preserve_color;
  say(upload.film && asked ? "a film is restyled whole: the region and colour controls work on photos" : "");
  act("POST", "/api/jobs", upload.film ? { apply: jobId, upload: upload.id } : { apply: jobId, upload: upload.id, form: region });
}

// the region and colour controls, as `clipstyle run` (and `apply`) --where/--mask/--invert-mask/--feather/--preserve-color
function regionForm() {
  return { where: $("where").value, mask: mask ? mask.id : null, invert_mask: $("invert-mask").checked,
           feather: $("feather").value, preserve_color: $("preserve-color").checked };
}

function setTargets(target) {
  styles = target ? target.targets.filter((t) => t.image).map((t) => ({ id: t.image, name: t.name, weight: String(t.weight) })) : [];
  $("blend").checked = !!(target && target.blend);
  $("avoid").value = target ? target.avoid.join("\n") : "";
  $("avoid-weight").value = target ? target.avoid_weight : config.targets.avoid_weight;
  if (target && target.avoid.length) $("avoid-box").open = true;
  showStyles();
}

function showStyles() {
  $("style-list").replaceChildren(...styles.map((s, i) => {
    const weight = el("input", { type: "number", min: "0", step: "any", value: s.weight, title: "weight in a blend",
                                 className: "weight", oninput: (e) => { s.weight = e.target.value; } });
    return el("li", {}, el("img", { src: `/files/uploads/${s.id}.jpg`, alt: "" }), el("span", { className: "name", textContent: s.name }),
              weight, el("button", { type: "button", className: "plain", textContent: "Remove",
                                     onclick: () => { styles.splice(i, 1); showStyles(); } }));
  }));
}

async function sendStyles(files) {
  say("");
  for (const file of files) {
    try {
      const info = await api("POST", "/api/uploads", file,
                             { "X-Filename": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" });
      if (info.film) throw new Error(`${info.name}: a style image is an image, not a film`);
      if (!styles.some((s) => s.id === info.id)) styles.push({ id: info.id, name: info.name, weight: "1" });
    } catch (e) { say(e.message); }
  }
  $("style-images").value = "";
  showStyles();
}

function setRegion(region) {
  $("where").value = region && region.where ? region.where : "";
  $("invert-mask").checked = !!(region && region.invert_mask);
  $("feather").value = region ? region.feather : config.region.feather;
  $("preserve-color").checked = !!(region && region.preserve_color);
  showMask(region && region.mask ? { id: region.mask, name: region.mask_name } : null);
  if (region) $("region").open = true;
}

function showMask(info) {
  mask = info;
  $("mask").value = "";
  $("mask-name").textContent = info ? `mask: ${info.name}` : "";
  $("mask-clear").hidden = !info;
}

async function sendMask(file) {
  say("");
  $("mask-name").textContent = `uploading ${file.name}…`;
  try {
    const info = await api("POST", "/api/uploads", file,
                           { "X-Filename": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" });
    if (info.film) throw new Error(`${info.name}: a mask is an image, not a film`);
    showMask(info);
  } catch (e) {
    showMask(null);
    say(e.message);
  }
}

async function useSettings(id) {
  let job;
  try { job = await api("GET", `/api/jobs/${id}`); } catch (e) { return say(e.message); }
  applyPreset(job.preset in config.presets ? job.preset : "paper");
  for (const f of config.fields) if (f.name in job.settings) $("f-" + f.name).value = job.settings[f.name];
  $("seed").value = job.base_seed;
  // the prompt lines as typed: a blend's texts with their weights, none for a style image alone
  const target = job.target;
  $("prompts").value = !target ? job.prompt
    : target.targets.filter((t) => t.text !== undefined)
        .map((t) => target.blend ? `${t.text.replaceAll(":", "\\:")}:${t.weight}` : t.text).join("\n");
  setTargets(target);
  setRegion(job.region);
  showUpload({ id: job.upload, name: job.input_name });
  say("");
  window.scrollTo({ top: 0, behavior: "smooth" });
}

// --- the photo -----------------------------------------------------------------------------------

function showUpload(info) {
  upload = info;
  $("photo-view").src = `/files/uploads/${info.id}.jpg`;
  $("photo-view").hidden = false;
  let text = info.width ? `${info.name} (${info.width}×${info.height})` : info.name;
  if (info.film) {
    text = `${info.name} (film, ${info.width}×${info.height}, ${info.film.frames} frames, ${seconds(info.film.duration)}): `
         + "restyle it with Apply on a result";
  }
  $("photo-name").textContent = text;
}

function looksLikeFilm(file) {
  const dot = file.name.lastIndexOf(".");
  return file.type.startsWith("video/") || (dot > 0 && config.films.suffixes.includes(file.name.slice(dot).toLowerCase()));
}

async function sendPhoto(file) {
  say("");
  if (looksLikeFilm(file) && !config.films.available) return say(`${file.name}: ${config.films.hint}`);
  $("photo-name").textContent = `uploading ${file.name}…`;
  try {
    const info = await api("POST", "/api/uploads", file,
                           { "X-Filename": encodeURIComponent(file.name), "Content-Type": "application/octet-stream" });
    showUpload(info);
    if (info.notes && info.notes.length) say(`${info.name}: ${info.notes.join("; ")}`);
  } catch (e) {
    upload = null;
    $("photo-view").hidden = true;
    $("photo-name").textContent = "Drop a photo here, or click to choose one";
    $("photo-view").removeAttribute("src");
    say(e.message);
  }
}

// --- actions -------------------------------------------------------------------------------------

async function start() {
  say("");
  if (!upload) return say("choose a photo first");
  const prompts = $("prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
  if (!prompts.length && !styles.length) return say("type a prompt or add a style image");
  try {
    await api("POST", "/api/jobs", JSON.stringify({ upload: upload.id, prompts, form: formValues() }),
              { "Content-Type": "application/json" });
  } catch (e) { say(e.message); }
}

async function act(method, url, body) {
  try {
    await api(method, url, body ? JSON.stringify(body) : undefined, { "Content-Type": "application/json" });
  } catch (e) { say(e.message); }
}

// --- showing the state ---------------------------------------------------------------------------

function seconds(s) {
  if (s === null || s === undefined) return "–";
  if (s > 0 && s < 10) return `${Math.round(s * 10) / 10} s`;
  s = Math.round(s);
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

function drawCurve(losses) {
  const svg = $("curve");
  svg.replaceChildren();
  if (losses.length < 2) { $("curve-text").textContent = losses.length ? `loss ${losses[0][1].toPrecision(4)}` : ""; return; }
  const xs = losses.map((l) => l[0]), ys = losses.map((l) => l[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
  const points = losses.map(([x, y]) =>
    `${((x - x0) / (x1 - x0 || 1) * 296 + 2).toFixed(1)},${(88 - (y - y0) / (y1 - y0 || 1) * 86).toFixed(1)}`);
  svg.append(document.createElementNS("http://www.w3.org/2000/svg", "polyline"));
  svg.firstChild.setAttribute("points", points.join(" "));
  $("curve-text").textContent = `total loss ${ys[ys.length - 1].toPrecision(4)} at step ${x1} (from ${ys[0].toPrecision(4)})`;
}

function showCurrent(job) {
  $("current").hidden = !job;
  $("idle").hidden = !!job;
  if (!job) return;
  const verb = job.kind === "apply" ? "applying the style of" : "";
  $("current-title").textContent = `${verb} “${job.prompt}” on ${job.input_name} — ${job.status}`;
  // a film shows its first frame while it runs (frames are counted, not previewed), then plays
  let url = job.status === "running" ? `/api/jobs/${job.id}/preview?v=${job.preview}`
          : job.png ? `/files/results/${job.png}` : "";
  if (job.film) url = job.video ? "" : `/files/uploads/${job.upload}.jpg`;
  if (url && url !== shownPreview && (job.preview > 0 || job.png || job.film)) { $("live").src = url; shownPreview = url; }
  $("live").hidden = !url;
  const film = job.video ? `/files/results/${job.video}` : "";
  if (film && $("live-film").getAttribute("src") !== film) $("live-film").src = film;
  if (!film) $("live-film").removeAttribute("src");
  $("live-film").hidden = !film;
  $("progress").max = job.steps || 1;
  $("progress").value = job.step;
  const unit = job.film ? "frame" : "step";
  const parts = [`${unit} ${job.step} / ${job.steps}`, `${seconds(job.seconds)} elapsed`];
  if (job.status === "running") parts.push(`about ${seconds(job.eta)} left`);
  if (job.status === "stopped") parts.push(`stopped at step ${job.step}`);
  $("progress-text").textContent = parts.join(" · ");
  drawCurve(job.losses);
  $("curve").style.display = job.kind === "apply" ? "none" : "";  // applying a saved style has no loss
  $("stop").disabled = job.status !== "running";
  $("stop").dataset.job = job.id;
}

function showQueue(state, byId) {
  const items = state.queue.map((id, i) => {
    const job = byId[id];
    return el("li", {}, `#${i + 1} “${job.prompt}” on ${job.input_name} `,
              el("button", { className: "plain", textContent: "Cancel", onclick: () => act("POST", `/api/jobs/${id}/stop`) }));
  });
  $("queue").replaceChildren(...(items.length ? items : [el("li", { className: "muted", textContent: "empty" })]));
}

function card(job) {
  const region = job.region || {};
  const facts = [job.kind === "stylize" ? `seed ${job.base_seed}` : "", job.size ? `${job.size[0]}×${job.size[1]}` : "",
                 job.film ? `film, ${job.steps} frames` : "",
                 job.kind === "apply" ? `style applied (strength ${job.strength})` : `${job.steps} steps`,
                 region.where ? `where “${region.where}”` : "", region.mask_name ? `mask ${region.mask_name}` : "",
                 region.invert_mask ? "inverted" : "", region.preserve_color ? "colours kept" : "",
                 job.target && job.target.avoid.length ? `avoiding “${job.target.avoid.join("”, “")}”` : "",
                 job.status === "stopped" ? `stopped at step ${job.step}` : ""].filter(Boolean).join(" · ");
  const links = el("p", {}, job.video
    ? el("a", { href: `/files/results/${job.video}`, download: "", className: "download-film", textContent: "film" })
    : el("a", { href: `/files/results/${job.png}`, download: "", className: "download-png", textContent: "PNG" }));
  if (job.style) links.append(el("a", { href: `/files/results/${job.style}`, download: "", textContent: "style file" }));
  const buttons = el("p", {});
  if (job.kind === "stylize") buttons.append(el("button", { className: "plain use", textContent: "Use these settings", onclick: () => useSettings(job.id) }));
  if (job.style) buttons.append(el("button", { className: "plain apply", textContent: "Apply to the photo or film above",
    onclick: () => applyStyle(job.id) }));
  buttons.append(el("button", { className: "plain", textContent: "Delete", onclick: () => act("DELETE", `/api/jobs/${job.id}`) }));
  const picture = job.video
    ? el("video", { src: `/files/results/${job.video}`, controls: true, preload: "metadata", title: job.prompt })
    : el("img", { src: `/files/results/${job.png}`, alt: job.prompt, loading: "lazy" });
  return el("div", { className: "card", dataset: { job: job.id } }, picture,
    el("p", { className: "prompt", textContent: job.prompt }),
    el("p", { className: "muted", textContent: `${job.input_name} · ${facts}` }),
    links, buttons,
    el("details", { ontoggle: (e) => showMetadata(e.target, job.id) }, el("summary", { textContent: "metadata" }), el("pre")));
}

async function showMetadata(details, id) {
  if (!details.open) return;
  try {
    const job = await api("GET", `/api/jobs/${id}`);
    // the PNG's text chunks as they are (parsing them would round 64-bit seeds)
    details.querySelector("pre").textContent = Object.entries(job.metadata || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
  } catch (e) { say(e.message); }
}

function render(state) {
  const byId = Object.fromEntries(state.jobs.map((j) => [j.id, j]));
  const ran = state.jobs.filter((j) => j.status !== "queued" && j.status !== "cancelled" && (j.png || j.video || j.status === "running" || j.status === "failed"));
  const current = state.running ? byId[state.running] : ran.filter((j) => j.finished !== null).sort((a, b) => b.finished - a.finished)[0];
  showCurrent(current || null);
  showQueue(state, byId);
  for (const j of state.jobs) {
    if (j.status === "failed" && !reported.has(j.id)) { reported.add(j.id); say(`“${j.prompt}”: ${j.error}`); }
    if (j.status === "cancelled" && j.film && j.step > 0 && !reported.has(j.id)) {
      reported.add(j.id);
      say(`${j.input_name}: stopped at frame ${j.step} of ${j.steps}; nothing kept (a film is written whole or not at all)`);
    }
  }
  const kept = state.jobs.filter((j) => (j.status === "done" || j.status === "stopped") && (j.png || j.video)).reverse();
  const key = kept.map((j) => j.id).join();
  if (key !== galleryKey) { galleryKey = key; $("cards").replaceChildren(...kept.map(card)); }
}

function listen() {
  const source = new EventSource("/api/events");
  source.onopen = () => { $("connection").textContent = "connected"; };
  source.onerror = () => { $("connection").textContent = "server not reachable, retrying…"; };
  source.onmessage = (e) => render(JSON.parse(e.data));
}

// --- start ---------------------------------------------------------------------------------------

async function main() {
  try {
    config = await api("GET", "/api/config");
  } catch (e) { return say(`cannot read the settings: ${e.message}`); }
  buildForm();
  $("photo").addEventListener("change", () => { if ($("photo").files[0]) sendPhoto($("photo").files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) sendPhoto(e.dataTransfer.files[0]);
  });
  $("mask").addEventListener("change", () => { if ($("mask").files[0]) sendMask($("mask").files[0]); });
  $("mask-clear").addEventListener("click", () => showMask(null));
  $("style-images").addEventListener("change", () => sendStyles([...$("style-images").files]));
  $("start").addEventListener("click", start);
  $("stop").addEventListener("click", () => act("POST", `/api/jobs/${$("stop").dataset.job}/stop`));
  listen();
}

main();
