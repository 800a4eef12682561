// SAM2 Segment: a point and box editor on the node. It shows the picture the node segments (the upstream Load
// Image's file before a run, the node's own input after one, with the masks it made), and writes the clicks into
// the node's `points`, `negative_points` and `boxes` widgets in the JSON the node reads, so the prompts are saved
// with the workflow and go into the queued prompt / API export like any typed value.
//   left click = a point on the object, right click = a point that is not the object, drag = a box (one object
//   per box), click on a point = remove it, click on a box's × = remove the box.
import { app } from "../../../scripts/app.js";
import { chainCallback, onRestoredOutputs, viewURL } from "./atelier_common.js";

const NODE = "AtelierSAM2Segment";
const WIDGET = "atelier_sam2_editor";
const HIT = 9; // px on screen: how close a click must be to a point or a box's × to hit it
const DRAG = 4; // px on screen: a press that moves further is a box, not a click
const MIN_HEIGHT = 260;
const COLORS = { positive: "#22c55e", negative: "#ef4444", box: "#38bdf8" };
const HINT = "left click: point · right click: not-object point · drag: box · " +
             "click a point or a box's × to remove it";

// ------------------------------------------------------------------------------------------- prompt text

function number(v) {
    return typeof v === "number" && Number.isFinite(v) ? v : null;
}

// The node's formats: [{"x": 1, "y": 2}, ...] or [[1, 2], ...] (a single point too); empty = none.
function parsePoints(text) {
    if (!text || !String(text).trim()) return [];
    let data = JSON.parse(text);
    if (data === null) return [];
    if (!Array.isArray(data) || (data.length === 2 && data.every((v) => number(v) !== null))) data = [data];
    return data.map((item) => {
        const [x, y] = Array.isArray(item) ? item : [item?.x, item?.y];
        if (number(x) === null || number(y) === null) throw new Error(`not a point: ${JSON.stringify(item)}`);
        return { x, y };
    });
}

// [[x0, y0, x1, y1], ...] (a single box too); empty = none.
function parseBoxes(text) {
    if (!text || !String(text).trim()) return [];
    let data = JSON.parse(text);
    if (data === null) return [];
    if (Array.isArray(data) && data.length === 4 && data.every((v) => number(v) !== null)) data = [data];
    if (!Array.isArray(data)) throw new Error("not a list of boxes");
    return data.map((b) => {
        if (!Array.isArray(b) || b.length !== 4 || b.some((v) => number(v) === null)) {
            throw new Error(`not a box: ${JSON.stringify(b)}`);
        }
        return b.slice();
    });
}

// What the editor writes: the same JSON the node's tooltips and README show; "" when there is nothing.
export function formatPoints(points) {
    return points.length ? `[${points.map((p) => `{"x": ${p.x}, "y": ${p.y}}`).join(", ")}]` : "";
}

export function formatBoxes(boxes) {
    return boxes.length ? `[${boxes.map((b) => `[${b.join(", ")}]`).join(", ")}]` : "";
}

// ------------------------------------------------------------------------------------------- image source

// The Load Image node feeding `image` directly (through Reroutes), and its file as a /view URL.
function upstreamImage(node) {
    const slot = node.findInputSlot?.("image");
    if (slot == null || slot < 0 || node.inputs?.[slot]?.link == null) return null;
    let origin = node.getInputNode(slot);
    for (let hops = 0; origin && origin.type === "Reroute" && hops < 32; hops++) origin = origin.getInputNode(0);
    if (!origin) return null;
    const widget = origin.widgets?.find((w) => w.name === "image");
    const isLoader = origin.comfyClass === "LoadImage" || origin.widgets?.some((w) => w.name === "upload");
    if (!isLoader || typeof widget?.value !== "string" || !widget.value) return null;
    let value = widget.value;
    let type = "input";
    const tagged = value.match(/^(.*) \[(input|output|temp)\]$/);
    if (tagged) [, value, type] = tagged;
    const cut = value.lastIndexOf("/");
    const file = { filename: value.slice(cut + 1), subfolder: cut >= 0 ? value.slice(0, cut) : "", type };
    return { key: `${type}/${value}`, url: viewURL(file) };
}

// ------------------------------------------------------------------------------------------------ editor

class Sam2Editor {
    constructor(node) {
        this.node = node;
        this.images = new Map(); // url -> HTMLImageElement
        this.run = null; // the last run's {image, overlay, width, height, prompts, upstreamKey}
        this.drag = null;
        this.problem = "";

        this.element = document.createElement("div");
        this.element.className = "atelier-sam2-editor";
        Object.assign(this.element.style, {
            display: "flex", flexDirection: "column", gap: "2px", boxSizing: "border-box", minHeight: "0",
        });
        this.bar = document.createElement("div");
        Object.assign(this.bar.style, {
            display: "flex", alignItems: "center", gap: "6px", font: "11px sans-serif", color: "#bbb",
            flex: "0 0 auto", minHeight: "20px",
        });
        this.status = document.createElement("span");
        this.status.className = "atelier-sam2-status";
        Object.assign(this.status.style, { flex: "1 1 auto", overflow: "hidden", whiteSpace: "nowrap",
                                           textOverflow: "ellipsis" });
        this.clear = document.createElement("button");
        this.clear.className = "atelier-sam2-clear";
        this.clear.textContent = "Clear";
        this.clear.title = "Remove every point and box";
        Object.assign(this.clear.style, { font: "11px sans-serif", padding: "1px 8px", cursor: "pointer" });
        this.clear.addEventListener("click", (e) => {
            e.stopPropagation();
            this.write({ points: [], negative: [], boxes: [] });
        });
        this.bar.append(this.status, this.clear);

        this.canvas = document.createElement("canvas");
        this.canvas.className = "atelier-sam2-canvas";
        this.canvas.title = HINT;
        Object.assign(this.canvas.style, { flex: "1 1 auto", width: "100%", minHeight: "0", cursor: "crosshair",
                                           background: "#1e1e1e", borderRadius: "4px", touchAction: "none" });
        this.element.append(this.bar, this.canvas);

        this.canvas.addEventListener("contextmenu", (e) => { e.preventDefault(); e.stopPropagation(); });
        this.canvas.addEventListener("pointerdown", (e) => this.onDown(e));
        this.canvas.addEventListener("pointermove", (e) => this.onMove(e));
        this.canvas.addEventListener("pointerup", (e) => this.onUp(e));
        this.canvas.addEventListener("pointercancel", () => { this.drag = null; this.draw(); });
        new ResizeObserver(() => this.draw()).observe(this.canvas);
    }

    widget(name) {
        return this.node.widgets?.find((w) => w.name === name);
    }

    // The prompts in the widgets now; a field whose text does not parse is reported and left alone.
    read() {
        const out = { points: [], negative: [], boxes: [], bad: [] };
        const fields = [["points", "points", parsePoints], ["negative", "negative_points", parsePoints],
                        ["boxes", "boxes", parseBoxes]];
        for (const [key, name, parse] of fields) {
            try {
                out[key] = parse(this.widget(name)?.value ?? "");
            } catch {
                out.bad.push(name);
            }
        }
        return out;
    }

    texts() {
        return ["points", "negative_points", "boxes"].map((n) => String(this.widget(n)?.value ?? ""));
    }

    write(prompts) {
        const values = { points: formatPoints(prompts.points), negative_points: formatPoints(prompts.negative),
                         boxes: formatBoxes(prompts.boxes) };
        // one change of the workflow, as LiteGraph reports its own edits: the frontend marks the workflow
        // modified and records an undo step
        app.canvas?.emitBeforeChange?.();
        try {
            for (const [name, value] of Object.entries(values)) {
                const w = this.widget(name);
                if (!w || w.value === value) continue;
                w.value = value;
                w.callback?.(value, app.canvas, this.node);
            }
        } finally {
            app.canvas?.emitAfterChange?.();
        }
        this.node.setDirtyCanvas(true, true);
        this.draw();
    }

    // Which picture to show: the last run's, unless the Load Image feeding the node now holds another file.
    source() {
        const up = upstreamImage(this.node);
        if (this.run && (!up || up.key === this.run.upstreamKey)) {
            return { kind: "run", url: this.run.image, overlay: this.run.overlay,
                     width: this.run.width, height: this.run.height };
        }
        if (up) {
            const img = this.image(up.url);
            const ready = img.complete && img.naturalWidth > 0;
            return { kind: "upstream", url: up.url, width: ready ? img.naturalWidth : 0,
                     height: ready ? img.naturalHeight : 0 };
        }
        return null;
    }

    image(url) {
        let img = this.images.get(url);
        if (!img) {
            img = new Image();
            img.onload = () => { this.draw(); this.node.setDirtyCanvas(true, false); };
            img.onerror = () => { this.problem = `could not load ${decodeURIComponent(url)}`; this.draw(); };
            img.src = url;
            this.images.set(url, img);
            if (this.images.size > 8) this.images.delete(this.images.keys().next().value);
        }
        return img;
    }

    // image pixels <-> canvas pixels (the picture letterboxed in the canvas)
    layout(src) {
        const cw = this.canvas.width, ch = this.canvas.height;
        if (!src || !src.width || !src.height || !cw || !ch) return null;
        const scale = Math.min(cw / src.width, ch / src.height);
        return { scale, ox: (cw - src.width * scale) / 2, oy: (ch - src.height * scale) / 2,
                 width: src.width, height: src.height };
    }

    // client (CSS) coordinates of an event -> canvas pixels
    canvasPoint(e) {
        const r = this.canvas.getBoundingClientRect();
        return { x: ((e.clientX - r.left) * this.canvas.width) / r.width,
                 y: ((e.clientY - r.top) * this.canvas.height) / r.height,
                 unit: this.canvas.width / r.width }; // canvas pixels per screen pixel
    }

    toImage(p, L) {
        const clamp = (v, hi) => Math.min(hi, Math.max(0, Math.round(v)));
        return { x: clamp((p.x - L.ox) / L.scale, L.width), y: clamp((p.y - L.oy) / L.scale, L.height) };
    }

    toCanvas(x, y, L) {
        return { x: L.ox + x * L.scale, y: L.oy + y * L.scale };
    }

    // client coordinates of image pixel (x, y): for tests and for anyone scripting the editor
    imageToClient(x, y) {
        const L = this.layout(this.source());
        if (!L) return null;
        const r = this.canvas.getBoundingClientRect();
        const c = this.toCanvas(x, y, L);
        return { x: r.left + (c.x * r.width) / this.canvas.width, y: r.top + (c.y * r.height) / this.canvas.height };
    }

    hit(prompts, p, L, unit) {
        const near = (q, r) => Math.hypot(q.x - p.x, q.y - p.y) <= r * unit;
        for (const [key, list] of [["points", prompts.points], ["negative", prompts.negative]]) {
            for (let i = list.length - 1; i >= 0; i--) {
                if (near(this.toCanvas(list[i].x, list[i].y, L), HIT)) return { key, index: i };
            }
        }
        for (let i = prompts.boxes.length - 1; i >= 0; i--) {
            const b = prompts.boxes[i];
            if (near(this.toCanvas(b[2], b[1], L), HIT)) return { key: "boxes", index: i };
        }
        return null;
    }

    onDown(e) {
        // no preventDefault here: it would swallow the mouseup on which the frontend records the change (the
        // workflow's modified mark, undo)
        e.stopPropagation();
        if (e.button !== 0 && e.button !== 2) return;
        const L = this.layout(this.source());
        if (!L) return;
        this.canvas.setPointerCapture?.(e.pointerId);
        this.drag = { button: e.button, start: this.canvasPoint(e), now: this.canvasPoint(e), moved: false };
    }

    onMove(e) {
        if (!this.drag) return;
        e.stopPropagation();
        const now = this.canvasPoint(e);
        this.drag.now = now;
        const d = this.drag.start;
        if (this.drag.button === 0 && Math.hypot(now.x - d.x, now.y - d.y) > DRAG * now.unit) this.drag.moved = true;
        if (this.drag.moved) this.draw();
    }

    onUp(e) {
        const drag = this.drag;
        this.drag = null;
        if (!drag) return;
        e.preventDefault();
        e.stopPropagation();
        const L = this.layout(this.source());
        if (!L) return this.draw();
        const prompts = this.read();
        const unit = drag.start.unit;
        const touched = (field) => prompts.bad.includes(field);
        if (drag.moved) {
            if (touched("boxes")) return this.draw();
            const a = this.toImage(drag.start, L), b = this.toImage(this.canvasPoint(e), L);
            const box = [Math.min(a.x, b.x), Math.min(a.y, b.y), Math.max(a.x, b.x), Math.max(a.y, b.y)];
            if (box[2] > box[0] && box[3] > box[1]) prompts.boxes.push(box);
        } else {
            const hit = this.hit(prompts, drag.start, L, unit);
            const field = { points: "points", negative: "negative_points", boxes: "boxes" };
            if (hit) {
                if (touched(field[hit.key])) return this.draw();
                prompts[hit.key].splice(hit.index, 1);
            } else {
                const key = drag.button === 2 ? "negative" : "points";
                if (touched(field[key])) return this.draw();
                prompts[key].push(this.toImage(drag.start, L));
            }
        }
        this.write(prompts);
    }

    // the run's prompts vs the widgets': a changed prompt dims the (old) masks
    stale() {
        return !this.run || this.texts().join("\u0000") !== this.run.prompts.join("\u0000");
    }

    draw() {
        const canvas = this.canvas;
        const rect = canvas.getBoundingClientRect();
        const dpr = window.devicePixelRatio || 1;
        const w = Math.max(1, Math.round(rect.width * dpr)), h = Math.max(1, Math.round(rect.height * dpr));
        if (canvas.width !== w || canvas.height !== h) [canvas.width, canvas.height] = [w, h];
        const ctx = canvas.getContext("2d");
        ctx.clearRect(0, 0, w, h);
        const src = this.source();
        const prompts = this.read();
        const counts = `${prompts.points.length} point(s), ${prompts.negative.length} negative, ` +
                       `${prompts.boxes.length} box(es)`;
        this.element.dataset.source = src?.kind ?? "none";
        this.element.dataset.imageWidth = src?.width ?? 0;
        this.element.dataset.imageHeight = src?.height ?? 0;
        const L = this.layout(src);
        if (!L) {
            this.status.textContent = this.problem || counts;
            ctx.fillStyle = "#999";
            ctx.font = `${12 * dpr}px sans-serif`;
            ctx.textAlign = "center";
            const msg = src ? "loading the picture…" : "Connect a Load Image, or run once, to see the picture here";
            ctx.fillText(msg, w / 2, h / 2);
            return;
        }
        const img = this.image(src.url);
        if (img.complete && img.naturalWidth) ctx.drawImage(img, L.ox, L.oy, L.width * L.scale, L.height * L.scale);
        if (src.overlay) {
            const shade = this.image(src.overlay);
            if (shade.complete && shade.naturalWidth) {
                ctx.globalAlpha = this.stale() ? 0.35 : 1;
                ctx.drawImage(shade, L.ox, L.oy, L.width * L.scale, L.height * L.scale);
                ctx.globalAlpha = 1;
            }
        }
        const r = 6 * dpr;
        ctx.lineWidth = 2 * dpr;
        for (const b of prompts.boxes) {
            const p = this.toCanvas(b[0], b[1], L), q = this.toCanvas(b[2], b[3], L);
            ctx.strokeStyle = COLORS.box;
            ctx.strokeRect(p.x, p.y, q.x - p.x, q.y - p.y);
            const x = this.toCanvas(b[2], b[1], L); // the × that removes the box
            ctx.fillStyle = COLORS.box;
            ctx.beginPath();
            ctx.arc(x.x, x.y, r, 0, 2 * Math.PI);
            ctx.fill();
            ctx.strokeStyle = "#000";
            ctx.lineWidth = 1.5 * dpr;
            ctx.beginPath();
            ctx.moveTo(x.x - r / 2, x.y - r / 2); ctx.lineTo(x.x + r / 2, x.y + r / 2);
            ctx.moveTo(x.x + r / 2, x.y - r / 2); ctx.lineTo(x.x - r / 2, x.y + r / 2);
            ctx.stroke();
            ctx.lineWidth = 2 * dpr;
        }
        for (const [list, color] of [[prompts.points, COLORS.positive], [prompts.negative, COLORS.negative]]) {
            for (const pt of list) {
                const c = this.toCanvas(pt.x, pt.y, L);
                ctx.fillStyle = color;
                ctx.strokeStyle = "#fff";
                ctx.beginPath();
                ctx.arc(c.x, c.y, r, 0, 2 * Math.PI);
                ctx.fill();
                ctx.stroke();
            }
        }
        if (this.drag?.moved) {
            const a = this.drag.start, b = this.drag.now;
            ctx.setLineDash([5 * dpr, 4 * dpr]);
            ctx.strokeStyle = COLORS.box;
            ctx.strokeRect(Math.min(a.x, b.x), Math.min(a.y, b.y), Math.abs(b.x - a.x), Math.abs(b.y - a.y));
            ctx.setLineDash([]);
        }
        const bad = prompts.bad.length ? ` · ${prompts.bad.join(", ")}: not valid JSON (fix the text or Clear)` : "";
        this.status.textContent = `${src.width}×${src.height} · ${counts}${bad}`;
    }

    // the node's UI output after a run: {image, overlay, width, height, objects, prompts}
    executed(info) {
        const up = upstreamImage(this.node);
        this.runInfo = info;
        this.run = { image: viewURL(info.image), overlay: info.overlay ? viewURL(info.overlay) : null,
                     width: info.width, height: info.height, prompts: info.prompts ?? [],
                     upstreamKey: up?.key ?? null };
        this.problem = "";
        this.draw();
    }
}

app.registerExtension({
    name: "atelier.sam2_editor",
    // outputs restored by the frontend (switching back to this workflow's tab): show the last run again
    onNodeOutputsUpdated(outputs) {
        onRestoredOutputs(outputs, (node, output) => {
            const editor = node.atelierSam2Editor;
            const info = output.atelier_sam2?.[0];
            if (editor && info && info.image?.filename !== editor.runInfo?.image?.filename) editor.executed(info);
        });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE) return;

        chainCallback(nodeType.prototype, "onNodeCreated", function () {
            const editor = new Sam2Editor(this);
            const widget = this.addDOMWidget(WIDGET, "atelier_sam2_editor", editor.element, {
                serialize: false, // not an input: never in widgets_values nor in the queued prompt
                hideOnZoom: false,
                getMinHeight: () => MIN_HEIGHT,
            });
            widget.serialize = false;
            widget.editor = editor;
            this.atelierSam2Editor = editor;
            this.setSize([Math.max(this.size[0], 400), Math.max(this.size[1], this.computeSize()[1])]);
        });

        // a typed value, another Load Image file, a resize: keep the picture and the marks current
        chainCallback(nodeType.prototype, "onDrawForeground", function () {
            const editor = this.atelierSam2Editor;
            if (!editor) return;
            const src = editor.source();
            const sig = [editor.texts().join("\u0000"), src?.url, src?.width, src?.height].join("|");
            if (sig !== editor.lastSig) {
                editor.lastSig = sig;
                editor.draw();
            }
        });

        chainCallback(nodeType.prototype, "onExecuted", function (message) {
            const info = message?.atelier_sam2?.[0];
            if (info && this.atelierSam2Editor) this.atelierSam2Editor.executed(info);
        });
    },
});
