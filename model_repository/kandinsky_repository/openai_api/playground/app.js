// The playground's logic. It reads the server's limits from GET v1/models (the model object's "kandinsky"
// member), builds one OpenAI Images API request per mode (generations: JSON; edits and variations:
// multipart, as OpenAI's SDKs send them), always streamed so the previews show while the model denoises,
// and shows the server's error messages as they are. Cancel aborts the request, which stops the
// generation on the server within a step.

const $ = (id) => document.getElementById(id);
const FROM_IMAGE = new Set(["image_to_image", "variations", "fuse", "inpaint", "outpaint"]);
const IMAGE_SIZED = new Set(["image_to_image", "inpaint", "outpaint"]); // output: the input's size (+ margins)
const PROMPTED = new Set(["text_to_image", "image_to_image", "fuse", "inpaint", "outpaint"]);
const TOKEN_KEY = "kandinsky-playground-token";

let limits = null; // the "kandinsky" member of the served model
let controller = null; // the running request's AbortController
let painting = null; // the brush's last point while a pointer is down

function mode() {
  return document.querySelector("input[name=mode]:checked").value;
}

function authHeaders(extra = {}) {
  const token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
  if (message) document.body.dataset.state = "error";
}

function setStatus(text) {
  $("status").textContent = text;
}

function log(text) {
  const item = document.createElement("li");
  item.textContent = text;
  $("events").append(item);
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error?.message ?? JSON.stringify(body)}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// -- the controls that apply to the chosen mode ---------------------------------------------------------

function updateVisibility() {
  const chosen = mode();
  const groups = {
    prompted: PROMPTED.has(chosen),
    sized: !IMAGE_SIZED.has(chosen),
    "from-image": FROM_IMAGE.has(chosen),
    "image-sized": IMAGE_SIZED.has(chosen),
  };
  for (const element of document.querySelectorAll("[data-for]")) {
    const key = element.dataset.for;
    element.hidden = !(key in groups ? groups[key] : key === chosen);
  }
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(
    ...values.map((value) => {
      const option = new Option(String(value), String(value));
      option.selected = value === chosen;
      return option;
    }),
  );
}

function sides() {
  if (limits.static_size) return [limits.static_size[0]];
  const values = [];
  for (let side = limits.min_image_size; side <= limits.max_image_size; side += limits.size_multiple) {
    values.push(side);
  }
  return values;
}

async function loadLimits() {
  let response;
  try {
    response = await fetch("v1/models", { headers: authHeaders() });
  } catch (error) {
    showError(`cannot reach the server: ${error.message}`);
    return;
  }
  if (!response.ok) {
    showError(`cannot read the server's limits: ${await errorText(response)}`);
    setStatus("Not connected.");
    return;
  }
  const model = (await response.json()).data[0];
  limits = model.kandinsky;
  const available = sides();
  const preferred = available.includes(512) ? 512 : available[available.length - 1];
  const height = limits.static_size ? [limits.static_size[0]] : available;
  const width = limits.static_size ? [limits.static_size[1]] : available;
  fillSelect($("width"), width, limits.static_size ? width[0] : preferred);
  fillSelect($("height"), height, limits.static_size ? height[0] : preferred);
  fillSelect($("n"), Array.from({ length: limits.max_images_per_request }, (_, i) => i + 1), 1);
  const partials = Array.from({ length: limits.max_partial_images + 1 }, (_, i) => i);
  fillSelect($("partials"), partials, limits.max_partial_images);
  const defaults = limits.defaults;
  $("steps").value = defaults.num_inference_steps;
  $("prior-steps").value = defaults.prior_num_inference_steps;
  $("guidance").value = defaults.guidance_scale;
  $("prior-guidance").value = defaults.prior_guidance_scale;
  $("strength").value = defaults.strength;
  const scheduler = $("scheduler");
  scheduler.replaceChildren(scheduler.options[0]);
  for (const name of limits.schedulers) scheduler.append(new Option(name, name));
  for (const id of ["left", "top", "right", "bottom"]) $(id).step = limits.size_multiple;
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.disabled = !limits.modes.includes(radio.value);
  }
  showError("");
  setStatus(`Ready: ${model.id}.`);
  document.body.dataset.state = "ready";
}

// -- the input image and the brush ---------------------------------------------------------------------

function fitted(width, height) {
  if (limits.static_size) return [limits.static_size[1], limits.static_size[0]];
  const { size_multiple: step, min_image_size: low, max_image_size: high } = limits;
  const scale = Math.min(1, high / Math.max(width, height));
  const round = (side) => Math.min(high, Math.max(low, Math.round((side * scale) / step) * step));
  return [round(width), round(height)];
}

async function setSource(url) {
  const picture = new Image();
  picture.src = url;
  await picture.decode();
  const [width, height] = fitted(picture.naturalWidth, picture.naturalHeight);
  for (const canvas of [$("source"), $("mask")]) {
    canvas.width = width;
    canvas.height = height;
  }
  $("source").getContext("2d").drawImage(picture, 0, 0, width, height);
  log(`input image ${width}x${height}`);
}

function brushAt(event) {
  const canvas = $("mask");
  const box = canvas.getBoundingClientRect();
  const x = ((event.clientX - box.left) * canvas.width) / box.width;
  const y = ((event.clientY - box.top) * canvas.height) / box.height;
  const context = canvas.getContext("2d");
  context.strokeStyle = context.fillStyle = "#ff2d55"; // opaque: the overlay's CSS opacity shows through
  context.lineWidth = Number($("brush").value) * (canvas.width / box.width);
  context.lineCap = "round";
  context.beginPath();
  const from = painting ?? { x, y };
  context.moveTo(from.x, from.y);
  context.lineTo(x, y);
  context.stroke();
  painting = { x, y };
}

function toBlob(canvas) {
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}

// OpenAI's mask: opaque where the image stays, transparent where it is repainted (the painted strokes).
function maskBlob() {
  const painted = $("mask");
  const mask = document.createElement("canvas");
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext("2d");
  context.fillStyle = "#000";
  context.fillRect(0, 0, mask.width, mask.height);
  context.globalCompositeOperation = "destination-out";
  context.drawImage(painted, 0, 0);
  return toBlob(mask);
}

// -- requests ------------------------------------------------------------------------------------------

function number(id) {
  return Number($(id).value);
}

function fields(chosen) {
  const out = { n: number("n"), num_inference_steps: number("steps"), guidance_scale: number("guidance") };
  if (!IMAGE_SIZED.has(chosen)) out.size = `${$("width").value}x${$("height").value}`;
  if (PROMPTED.has(chosen)) {
    out.prompt = $("prompt").value;
    if ($("negative").value.trim()) out.negative_prompt = $("negative").value;
    out.prior_num_inference_steps = number("prior-steps");
    out.prior_guidance_scale = number("prior-guidance");
  }
  const seed = $("seed").value.trim();
  if (seed) out.seed = /^[0-9]+$/.test(seed) ? BigInt(seed) : seed; // seeds go up to 2**63 - 1
  if ($("scheduler").value) out.scheduler = $("scheduler").value;
  if (chosen === "image_to_image") out.strength = number("strength");
  if (chosen === "fuse") out.weights = [1 - number("image-weight"), number("image-weight")];
  if (chosen === "outpaint") for (const side of ["left", "top", "right", "bottom"]) out[side] = number(side);
  out.stream = true;
  out.partial_images = number("partials");
  return out;
}

// JSON with big integers written as digits (JSON.stringify refuses BigInt; a Number loses digits).
function json(body) {
  const digits = [];
  const text = JSON.stringify(body, (key, value) => {
    if (typeof value !== "bigint") return value;
    digits.push(value.toString());
    return `__bigint_${digits.length - 1}__`;
  });
  return text.replace(/"__bigint_([0-9]+)__"/g, (_, index) => digits[Number(index)]);
}

async function send(chosen, signal) {
  const body = fields(chosen);
  if (chosen === "text_to_image") {
    return fetch("v1/images/generations", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: json(body),
      signal,
    });
  }
  if (!$("source").width) throw new Error("choose an input image first");
  const form = new FormData();
  form.append("image", await toBlob($("source")), "image.png");
  if (chosen === "inpaint") form.append("mask", await maskBlob(), "mask.png");
  for (const [name, value] of Object.entries(body)) {
    for (const item of Array.isArray(value) ? value : [value]) form.append(name, String(item));
  }
  const route = chosen === "variations" ? "v1/images/variations" : "v1/images/edits";
  return fetch(route, { method: "POST", headers: authHeaders(), body: form, signal });
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) event = line.slice(6).trim();
    else if (line.startsWith("data:")) data.push(line.slice(5).trim());
  }
  const text = data.join("\n");
  // The seed as its digits: JSON.parse would round a seed above 2**53 to another seed.
  const seed = text.match(/"seed":\s*([0-9]+)/)?.[1];
  return { event, data: text ? { ...JSON.parse(text), seed } : null };
}

function addResult(data, index) {
  const url = `data:image/${data.output_format};base64,${data.b64_json}`;
  const box = document.createElement("div");
  box.className = "result";
  const picture = document.createElement("img");
  picture.src = url;
  picture.alt = `result ${index + 1}`;
  picture.id = `result-${index}`;
  const download = document.createElement("a");
  download.href = url;
  download.download = `kandinsky-${data.seed ?? "image"}-${index + 1}.${data.output_format}`;
  download.textContent = "Download";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "Use as input";
  reuse.addEventListener("click", async () => {
    await setSource(url);
    if (!FROM_IMAGE.has(mode())) document.querySelector("input[value=image_to_image]").click();
  });
  box.append(picture, download, reuse);
  $("results").append(box);
}

async function readEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let images = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const { event, data } = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (event === "error") {
        showError(data.error.message);
      } else if (event.endsWith(".partial_image")) {
        $("preview").src = `data:image/${data.output_format};base64,${data.b64_json}`;
        $("preview").hidden = false;
        log(`preview ${data.partial_image_index + 1}`);
        setStatus(`Denoising… preview ${data.partial_image_index + 1}`);
      } else if (event.endsWith(".completed")) {
        addResult(data, images);
        images += 1;
        log(`image ${images} done`);
        $("seed-used").textContent = `(seed ${data.seed}, ${data.size})`;
      }
    }
  }
  if (images) {
    setStatus(`Done: ${images} image${images > 1 ? "s" : ""}.`);
    document.body.dataset.state = "done";
  }
}

async function generate(event) {
  event.preventDefault();
  if (!limits) await loadLimits();
  if (!limits) return;
  showError("");
  $("events").replaceChildren();
  $("results").replaceChildren();
  $("preview").hidden = true;
  $("seed-used").textContent = "";
  controller = new AbortController();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  document.body.dataset.state = "running";
  setStatus("Generating…");
  try {
    const response = await send(mode(), controller.signal);
    if (!response.ok) {
      showError(await errorText(response));
      setStatus("Refused.");
      return;
    }
    log(`mode ${response.headers.get("kandinsky-mode")}`);
    await readEvents(response);
  } catch (error) {
    if (error.name === "AbortError") {
      setStatus("Cancelled.");
      document.body.dataset.state = "cancelled";
    } else {
      showError(error.message || String(error));
      setStatus("Failed.");
    }
  } finally {
    controller = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

// -- wiring --------------------------------------------------------------------------------------------

$("token").value = localStorage.getItem(TOKEN_KEY) ?? "";
$("token").addEventListener("change", () => {
  localStorage.setItem(TOKEN_KEY, $("token").value.trim());
  loadLimits();
});
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", updateVisibility);
}
$("image-file").addEventListener("change", async () => {
  const file = $("image-file").files[0];
  if (!file) return;
  const url = URL.createObjectURL(file);
  try {
    await setSource(url);
  } catch {
    showError(`${file.name} is not an image this browser can read`);
  } finally {
    URL.revokeObjectURL(url);
  }
});
$("mask").addEventListener("pointerdown", (event) => {
  $("mask").setPointerCapture(event.pointerId);
  painting = null;
  brushAt(event);
});
$("mask").addEventListener("pointermove", (event) => {
  if (painting) brushAt(event);
});
for (const name of ["pointerup", "pointercancel"]) $("mask").addEventListener(name, () => (painting = null));
$("clear-mask").addEventListener("click", () => {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
});
$("form").addEventListener("submit", generate);
$("cancel").addEventListener("click", () => controller?.abort());
updateVisibility();
loadLimits();
