// The curve of a GuidersSchedule* node: its value at every step of a run, redrawn as its widgets change.
//
// The values come from the pack's route POST /guiders/schedule (nodes/web_routes.py), which evaluates the
// schedule with guidance_core, the same code that scales guidance while sampling: nothing here knows a
// formula. A widget change asks for the curve again after a short pause (debounce); an answer that a newer
// request has overtaken is dropped. Invalid widget values show the server's message instead of a curve.
//
// A term or CFG node whose `schedule` input is connected to one of these nodes draws the same curve as the
// scale it applies at each step, with the steps its start/end percent window leaves out shaded: the same
// route answers, given the node's window, which steps a run lets the term act at (nodes/web_routes.py).
// Disconnect the schedule and the curve goes.
//
// "preview steps" is a frontend-only control: it is kept in node.properties (saved with the workflow) and
// is neither a node input nor part of the prompt, so the Python node and saved workflows are unchanged.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION_NAME = "Guiders.SchedulePreview";
// Our schedule nodes and the kind guidance_core's schedule_from_dict reads for each. An explicit list:
// a name prefix would also match GuidersScheduledCFG, which takes a schedule rather than being one.
const SCHEDULE_KINDS = {
  GuidersScheduleConstant: "constant",
  GuidersScheduleLinear: "linear",
  GuidersScheduleCosine: "cosine",
  GuidersScheduleCustom: "custom",
};
const ROUTE = "/guiders/schedule";
const SCHEDULE_TYPE = "GUIDANCE_SCHEDULE"; // the socket type of a schedule (nodes/schedule_nodes.py)
const SCHEDULE_INPUT = "schedule";
const WINDOW_INPUTS = ["start_percent", "end_percent"];
const SCALE_CURVE_WIDGET = "scale_curve";
const STEPS_PROPERTY = "guiders_preview_steps";
const DEFAULT_STEPS = 20;
const MAX_STEPS = 200;
const DEBOUNCE_MS = 150;
const MAX_DOTS = 60; // above this many steps the dots would merge into the line
const SVG_NS = "http://www.w3.org/2000/svg";

const STYLE = `
.guiders-schedule-preview {
  display: flex; flex-direction: column; gap: 2px; box-sizing: border-box;
  width: 100%; height: 100%; padding: 2px 0; font-family: sans-serif; color: var(--descrip-text);
}
.guiders-schedule-preview .guiders-plot {
  flex: 1 1 auto; min-height: 0; width: 100%; box-sizing: border-box;
  background: var(--comfy-input-bg); border: 1px solid var(--border-color); border-radius: 4px;
}
.guiders-schedule-preview .guiders-plot text { fill: var(--descrip-text); font-size: 10px; }
.guiders-schedule-preview .guiders-grid { stroke: var(--border-color); stroke-width: 1; }
.guiders-schedule-preview .guiders-curve {
  fill: none; stroke: var(--fg-color); stroke-width: 1.5; stroke-linejoin: round;
}
.guiders-schedule-preview .guiders-area { fill: var(--fg-color); fill-opacity: 0.08; stroke: none; }
.guiders-schedule-preview .guiders-dot { fill: var(--fg-color); }
.guiders-schedule-preview .guiders-curve-off {
  fill: none; stroke: var(--fg-color); stroke-opacity: 0.35; stroke-width: 1; stroke-dasharray: 3 3;
}
.guiders-schedule-preview .guiders-dot-off { fill: var(--fg-color); fill-opacity: 0.3; }
.guiders-schedule-preview .guiders-off { fill: var(--border-color); fill-opacity: 0.35; stroke: none; }
.guiders-schedule-preview .guiders-cut { stroke: var(--error-text); stroke-width: 1; stroke-dasharray: 2 2; }
.guiders-schedule-preview .guiders-caption {
  flex: none; font-size: 11px; line-height: 14px;
  white-space: nowrap; overflow: hidden; text-overflow: ellipsis;
}
.guiders-schedule-preview .guiders-error {
  display: none; flex: 1 1 auto; min-height: 0; overflow: auto; box-sizing: border-box; padding: 4px 6px;
  font-size: 11px; line-height: 14px; color: var(--error-text);
  white-space: pre-wrap; overflow-wrap: anywhere;
  border: 1px solid var(--error-text); border-radius: 4px;
}
.guiders-schedule-preview[data-state="error"] .guiders-plot,
.guiders-schedule-preview[data-state="error"] .guiders-caption { display: none; }
.guiders-schedule-preview[data-state="error"] .guiders-error { display: block; }
`;

function addStyleOnce() {
  if (document.getElementById("guiders-schedule-preview-style")) return;
  const style = document.createElement("style");
  style.id = "guiders-schedule-preview-style";
  style.textContent = STYLE;
  document.head.append(style);
}

function svgElement(tag, attributes) {
  const element = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

// Short, readable numbers for labels: 7.5, 0.15, 12.3, -1
function formatValue(value) {
  return String(Number(value.toFixed(Math.abs(value) >= 10 ? 1 : 2)));
}

function chain(object, method, after) {
  const before = object[method];
  object[method] = function (...args) {
    const result = before?.apply(this, args);
    after.apply(this, args);
    return result;
  };
}

// [first, last] of each run of consecutive steps for which `test(step)` holds.
function runs(count, test) {
  const found = [];
  for (let step = 0; step < count; step++) {
    if (!test(step)) continue;
    if (found.length && found[found.length - 1][1] === step - 1) found[found.length - 1][1] = step;
    else found.push([step, step]);
  }
  return found;
}

// The curve on a 0-based value axis, so curves read at their true scale; steps are numbered from 1.
// With `active` (one flag per step), the steps a window leaves out are shaded and their part of the curve is
// dashed, with a line where the window cuts the curve; the solid curve is then the scale the run applies.
function drawCurve(plot, values, active = null) {
  const width = plot.clientWidth;
  const height = plot.clientHeight;
  if (!values || width < 40 || height < 30) return;
  plot.setAttribute("viewBox", `0 0 ${width} ${height}`);

  const low = Math.min(0, ...values);
  const peak = Math.max(0, ...values);
  const high = peak > low ? peak : low + 1; // all zeros: still a readable axis
  const labelWidth = 6 + 6 * Math.max(formatValue(low).length, formatValue(high).length);
  const left = labelWidth + 4;
  const right = width - 8;
  const top = 8;
  const bottom = height - 16;
  const lastStep = values.length - 1;
  const x = (step) => (lastStep === 0 ? (left + right) / 2 : left + (step * (right - left)) / lastStep);
  const y = (value) => bottom - ((value - low) * (bottom - top)) / (high - low);

  const points = values.map((value, step) => `${x(step).toFixed(1)},${y(value).toFixed(1)}`);
  const baseline = y(0); // the axis always holds 0
  const parts = [
    svgElement("line", { class: "guiders-grid", x1: left, x2: right, y1: y(high), y2: y(high),
      "stroke-dasharray": "3 3" }),
    svgElement("line", { class: "guiders-grid", x1: left, x2: right, y1: baseline, y2: baseline }),
    svgElement("line", { class: "guiders-grid", x1: left, x2: left, y1: top, y2: bottom }),
  ];
  const on = (step) => !active || active[step];
  if (!active) {
    parts.push(
      svgElement("polygon", { class: "guiders-area",
        points: `${x(0).toFixed(1)},${baseline} ${points.join(" ")} ${x(lastStep).toFixed(1)},${baseline}` }),
      svgElement("polyline", { class: "guiders-curve", points: points.join(" ") }),
    );
  } else {
    // Each run of steps the window leaves out: a shaded band half a step wide beyond its ends, so a single
    // step is visible too; a line at each cut.
    const half = lastStep === 0 ? (right - left) / 2 : (right - left) / lastStep / 2;
    for (const [first, last] of runs(values.length, (step) => !active[step])) {
      const x0 = Math.max(left, x(first) - half);
      const x1 = Math.min(right, x(last) + half);
      parts.push(svgElement("rect", { class: "guiders-off", x: x0, y: top, width: x1 - x0, height: bottom - top }));
      for (const cut of [x0, x1]) {
        if (cut > left && cut < right) {
          parts.push(svgElement("line", { class: "guiders-cut", x1: cut, x2: cut, y1: top, y2: bottom }));
        }
      }
    }
    parts.push(svgElement("polyline", { class: "guiders-curve-off", points: points.join(" ") }));
    for (const [first, last] of runs(values.length, on)) {
      parts.push(svgElement("polyline", { class: "guiders-curve",
        points: points.slice(first, last + 1).join(" ") }));
    }
  }
  if (values.length <= MAX_DOTS) {
    values.forEach((value, step) => parts.push(svgElement("circle", {
      class: on(step) ? "guiders-dot" : "guiders-dot-off", cx: x(step), cy: y(value), r: 2 })));
  }
  const label = (text, attributes) => {
    const element = svgElement("text", attributes);
    element.textContent = text;
    parts.push(element);
  };
  const valueLabel = { x: left - 4, "text-anchor": "end", "dominant-baseline": "middle" };
  label(formatValue(high), { ...valueLabel, y: y(high) });
  label(formatValue(low), { ...valueLabel, y: y(low) });
  label("step 1", { x: left, y: height - 4, "text-anchor": "start" });
  if (lastStep > 0) label(String(values.length), { x: right, y: height - 4, "text-anchor": "end" });
  plot.replaceChildren(...parts);
}


class SchedulePreview {
  constructor(node, kind, fieldNames) {
    this.node = node;
    this.kind = kind;
    this.fieldNames = fieldNames;
    this.values = null;
    this.requestedKey = null;
    this.requestNumber = 0;
    this.timer = null;

    // Re-request whenever one of the node's own inputs changes. A text widget calls its callback on every
    // keystroke, a number widget on every change; the debounce keeps that to one request per pause.
    for (const widget of this.fieldWidgets()) {
      chain(widget, "callback", () => this.requestCurve());
    }

    node.properties ??= {};
    node.properties[STEPS_PROPERTY] ??= DEFAULT_STEPS;
    this.stepsWidget = node.addWidget(
      "number",
      "preview steps",
      node.properties[STEPS_PROPERTY],
      (value) => this.setPreviewSteps(value),
      // serialize: false keeps it out of the prompt; property: the canvas mirrors it into node.properties.
      { min: 1, max: MAX_STEPS, step: 10, step2: 1, precision: 0, round: 1, serialize: false,
        property: STEPS_PROPERTY },
    );
    this.stepsWidget.serialize = false; // and out of widgets_values
    this.stepsWidget.tooltip = "How many sampling steps the curve below shows. Preview only: the run uses "
      + "its own number of steps.";

    this.element = this.buildElement();
    this.widget = node.addDOMWidget("schedule_preview", "guiders_schedule_preview", this.element, {
      serialize: false,
      getMinHeight: () => 120,
      getValue: () => undefined,
      setValue: () => {},
    });
    this.widget.serialize = false;

    this.resizeObserver = new ResizeObserver(() => this.draw());
    this.resizeObserver.observe(this.plot);
    this.requestCurve();
  }

  fieldWidgets() {
    return (this.node.widgets ?? []).filter((widget) => this.fieldNames.includes(widget.name));
  }

  buildElement() {
    addStyleOnce();
    const element = document.createElement("div");
    element.className = "guiders-schedule-preview";
    element.dataset.state = "loading";
    this.plot = svgElement("svg", { class: "guiders-plot" });
    this.caption = document.createElement("div");
    this.caption.className = "guiders-caption";
    this.caption.textContent = "…";
    this.errorBox = document.createElement("div");
    this.errorBox.className = "guiders-error";
    element.append(this.plot, this.caption, this.errorBox);
    return element;
  }

  previewSteps() {
    const steps = Math.round(Number(this.node.properties?.[STEPS_PROPERTY]));
    return Number.isFinite(steps) ? Math.min(MAX_STEPS, Math.max(1, steps)) : DEFAULT_STEPS;
  }

  setPreviewSteps(value) {
    const steps = Math.min(MAX_STEPS, Math.max(1, Math.round(Number(value)) || DEFAULT_STEPS));
    this.node.properties[STEPS_PROPERTY] = steps;
    if (this.stepsWidget.value !== steps) this.stepsWidget.value = steps;
    this.requestCurve();
  }

  payload() {
    const fields = {};
    for (const widget of this.fieldWidgets()) fields[widget.name] = widget.value;
    return { kind: this.kind, ...fields, steps: this.previewSteps() };
  }

  // Cheap enough to call on every canvas frame: it only sends when the widget values differ from the
  // last request, which also catches values set by code rather than through a widget's callback.
  requestCurve() {
    const key = JSON.stringify(this.payload());
    if (key === this.requestedKey) return;
    this.requestedKey = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.fetchCurve(key), DEBOUNCE_MS);
    notifyScaleCurves(this.node);
  }

  async fetchCurve(key) {
    const number = ++this.requestNumber;
    let message;
    let values = null;
    try {
      const response = await api.fetchApi(ROUTE, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: key,
      });
      const body = await response.json().catch(() => ({}));
      if (response.ok && Array.isArray(body.values)) values = body.values;
      else message = body.error ?? `the server answered ${response.status} ${response.statusText}`;
    } catch (error) {
      message = `could not reach the ComfyUI server for the curve: ${error.message ?? error}`;
    }
    if (number !== this.requestNumber) return; // a newer request was sent meanwhile
    if (values) this.showCurve(values);
    else this.showError(message);
  }

  showCurve(values) {
    this.values = values;
    const dataset = this.element.dataset;
    Object.assign(dataset, { state: "curve", steps: values.length, values: JSON.stringify(values) });
    delete this.element.dataset.error;
    const first = formatValue(values[0]);
    const last = formatValue(values[values.length - 1]);
    const low = formatValue(Math.min(...values));
    const high = formatValue(Math.max(...values));
    this.caption.textContent = `${values.length} steps: ${first} → ${last}   (min ${low}, max ${high})`;
    this.draw();
    this.node.setDirtyCanvas?.(true, false);
  }

  showError(message) {
    this.values = null;
    Object.assign(this.element.dataset, { state: "error", error: message });
    delete this.element.dataset.values;
    delete this.element.dataset.steps;
    this.errorBox.textContent = message;
    this.plot.replaceChildren();
    this.node.setDirtyCanvas?.(true, false);
  }

  draw() {
    drawCurve(this.plot, this.values);
  }

  // A removed node lets go of its timer, its pending answer and its observer; one added back (undo of a
  // removal in some extensions re-adds the same object) observes again.
  suspend() {
    clearTimeout(this.timer);
    this.requestNumber += 1; // drop any answer still on its way
    this.requestedKey = null;
    this.resizeObserver.disconnect();
  }

  resume() {
    this.resizeObserver.observe(this.plot);
    this.requestCurve();
  }
}


// The values (and, given a window, the active flags) the route answers for `key`, or the message to show.
async function fetchFromRoute(key) {
  try {
    const response = await api.fetchApi(ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: key,
    });
    const body = await response.json().catch(() => ({}));
    if (response.ok && Array.isArray(body.values)) return { values: body.values, active: body.active ?? null };
    return { message: body.error ?? `the server answered ${response.status} ${response.statusText}` };
  } catch (error) {
    return { message: `could not reach the ComfyUI server for the curve: ${error.message ?? error}` };
  }
}

// The nodes a schedule node's output feeds, told that its curve may have changed.
function notifyScaleCurves(node) {
  const graph = node.graph;
  for (const output of node.outputs ?? []) {
    for (const linkId of output.links ?? []) {
      const link = graph?.links?.get?.(linkId) ?? graph?.links?.[linkId];
      if (link) graph.getNodeById(link.target_id)?.guidersScaleCurve?.update();
    }
  }
}

// The curve in a term or CFG node whose `schedule` input is connected to a schedule node: the schedule's
// values at the schedule node's preview steps, with the steps the node's start/end percent window leaves out
// shaded. The widget exists only while such a schedule is connected.
class ScaleCurve {
  constructor(node, windowNames) {
    this.node = node;
    this.windowNames = windowNames;
    this.widget = null;
    this.requestedKey = null;
    this.requestNumber = 0;
    this.timer = null;
    for (const widget of node.widgets ?? []) {
      if ([...windowNames, "mode"].includes(widget.name)) chain(widget, "callback", () => this.update());
    }
  }

  scheduleNode() {
    const slot = this.node.inputs?.findIndex((input) => input.name === SCHEDULE_INPUT) ?? -1;
    if (slot < 0 || this.node.inputs[slot].link == null) return null;
    const source = this.node.getInputNode(slot);
    return source?.guidersSchedulePreview ? source : null;
  }

  // A node with a mode widget that offers "percent" (GuidersCFGInterval) uses its start/end percent only in
  // that mode; in its σ mode the interval falls on steps that depend on the model, so none is drawn.
  windowInUse() {
    const mode = this.node.widgets?.find((widget) => widget.name === "mode");
    return !mode?.options?.values?.includes?.("percent") || mode.value === "percent";
  }

  payload(source) {
    const body = source.guidersSchedulePreview.payload();
    if (!this.windowInUse()) return body;
    for (const widget of this.node.widgets ?? []) {
      if (this.windowNames.includes(widget.name)) body[widget.name] = widget.value;
    }
    return body;
  }

  // Cheap enough for every canvas frame: a request only when the schedule or the window changed.
  update() {
    const source = this.scheduleNode();
    if (!source) {
      this.remove();
      return;
    }
    this.add();
    const key = JSON.stringify(this.payload(source));
    if (key === this.requestedKey) return;
    this.requestedKey = key;
    clearTimeout(this.timer);
    this.timer = setTimeout(async () => {
      const number = ++this.requestNumber;
      const answer = await fetchFromRoute(key);
      if (number !== this.requestNumber || !this.widget) return; // overtaken, or the schedule went
      if (answer.values) this.showCurve(answer.values, answer.active, source);
      else this.showError(answer.message);
    }, DEBOUNCE_MS);
  }

  add() {
    if (this.widget) return;
    addStyleOnce();
    this.element = document.createElement("div");
    this.element.className = "guiders-schedule-preview guiders-scale-curve";
    this.element.dataset.state = "loading";
    this.plot = svgElement("svg", { class: "guiders-plot" });
    this.caption = document.createElement("div");
    this.caption.className = "guiders-caption";
    this.caption.textContent = "…";
    this.errorBox = document.createElement("div");
    this.errorBox.className = "guiders-error";
    this.element.append(this.plot, this.caption, this.errorBox);
    this.widget = this.node.addDOMWidget(SCALE_CURVE_WIDGET, "guiders_scale_curve", this.element, {
      serialize: false,
      getMinHeight: () => 120,
      getValue: () => undefined,
      setValue: () => {},
    });
    this.widget.serialize = false;
    this.resizeObserver = new ResizeObserver(() => this.draw());
    this.resizeObserver.observe(this.plot);
    const [minWidth, minHeight] = this.node.computeSize();
    this.node.setSize([Math.max(this.node.size[0], minWidth, 280), Math.max(this.node.size[1], minHeight)]);
    this.node.setDirtyCanvas?.(true, true);
  }

  remove() {
    this.suspend();
    if (!this.widget) return;
    this.node.removeWidget(this.widget);
    this.element.remove(); // "Nodes 2.0" (frontend 1.35) leaves a removed DOM widget's element in its node
    this.widget = null;
    this.values = null;
    this.node.setSize([this.node.size[0], this.node.computeSize()[1]]);
    this.node.setDirtyCanvas?.(true, true);
  }

  suspend() {
    clearTimeout(this.timer);
    this.requestNumber += 1;
    this.requestedKey = null;
    this.resizeObserver?.disconnect();
  }

  showCurve(values, active, source) {
    this.values = values;
    this.active = active;
    Object.assign(this.element.dataset, { state: "curve", values: JSON.stringify(values),
      active: JSON.stringify(active ?? values.map(() => true)) });
    delete this.element.dataset.error;
    const on = runs(values.length, (step) => !active || active[step]);
    const where = on.length === 0 ? "off at every step"
      : !active || active.every(Boolean) ? `on at all ${values.length} steps`
        : `on at step ${on.map(([a, b]) => (a === b ? `${a + 1}` : `${a + 1}–${b + 1}`)).join(", ")} of ${values.length}`;
    this.caption.textContent = `scale from "${source.title}": ${where}`;
    this.caption.title = "The scale per step this node applies: its schedule, shaded where the start/end percent "
      + "window turns the term off (the cut as with the simple scheduler; others may move it by a step).";
    this.draw();
    this.node.setDirtyCanvas?.(true, false);
  }

  showError(message) {
    this.values = null;
    Object.assign(this.element.dataset, { state: "error", error: message });
    delete this.element.dataset.values;
    delete this.element.dataset.active;
    this.errorBox.textContent = message;
    this.plot.replaceChildren();
    this.node.setDirtyCanvas?.(true, false);
  }

  draw() {
    if (this.widget) drawCurve(this.plot, this.values, this.active);
  }
}

// ComfyUI serves this folder twice when the pack's folder name differs from its pyproject name (once for
// WEB_DIRECTORY, once for [tool.comfy] web), so this module may be evaluated twice: register once.
function alreadyRegistered() {
  return (app.extensions ?? []).some((extension) => extension.name === EXTENSION_NAME);
}

if (!alreadyRegistered()) app.registerExtension({
  name: EXTENSION_NAME,
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const kind = SCHEDULE_KINDS[nodeData.name];
    if (!kind) {
      registerScaleCurve(nodeType, nodeData);
      return;
    }
    const fieldNames = [
      ...Object.keys(nodeData.input?.required ?? {}),
      ...Object.keys(nodeData.input?.optional ?? {}),
    ];

    chain(nodeType.prototype, "onNodeCreated", function () {
      this.guidersSchedulePreview = new SchedulePreview(this, kind, fieldNames);
      const [minWidth, minHeight] = this.computeSize();
      this.setSize([Math.max(this.size[0], minWidth, 280), Math.max(this.size[1], minHeight + 40)]);
    });
    chain(nodeType.prototype, "onConfigure", function () {
      // A loaded workflow sets widget values after the node was created, without their callbacks.
      const preview = this.guidersSchedulePreview;
      if (!preview) return;
      preview.stepsWidget.value = preview.previewSteps();
      preview.requestCurve();
    });
    chain(nodeType.prototype, "onDrawForeground", function () {
      this.guidersSchedulePreview?.requestCurve();
    });
    chain(nodeType.prototype, "onRemoved", function () {
      this.guidersSchedulePreview?.suspend();
    });
    chain(nodeType.prototype, "onAdded", function () {
      // Also runs right after onNodeCreated, when the node first joins a graph: resume() is idempotent.
      this.guidersSchedulePreview?.resume();
    });
  },
});

// A node with a `schedule` input of the schedule type gets the curve while that input is connected.
function registerScaleCurve(nodeType, nodeData) {
  const inputs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
  const scheduleSpec = inputs[SCHEDULE_INPUT];
  if (!Array.isArray(scheduleSpec) || scheduleSpec[0] !== SCHEDULE_TYPE) return;
  const windowNames = WINDOW_INPUTS.filter((name) => name in inputs);

  chain(nodeType.prototype, "onNodeCreated", function () {
    this.guidersScaleCurve = new ScaleCurve(this, windowNames);
  });
  // The link is in place (or gone) once the connection callbacks have run.
  chain(nodeType.prototype, "onConnectionsChange", function () {
    setTimeout(() => this.guidersScaleCurve?.update(), 0);
  });
  // A loaded workflow configures every node before its links all lead somewhere.
  chain(nodeType.prototype, "onConfigure", function () {
    setTimeout(() => this.guidersScaleCurve?.update(), 0);
  });
  chain(nodeType.prototype, "onDrawForeground", function () {
    this.guidersScaleCurve?.update();
  });
  chain(nodeType.prototype, "onRemoved", function () {
    this.guidersScaleCurve?.suspend();
  });
  chain(nodeType.prototype, "onAdded", function () {
    setTimeout(() => this.guidersScaleCurve?.update(), 0);
  });
}
