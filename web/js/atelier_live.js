// Live character panel (sidebar tab "Atelier Live"): the webcam or a video file → the server (pose + the
// Animate Character loop on the character of the last Animate Character run) → the generated frames, with the
// fps delivered here and the model's own fps.
// Never backs up: two frames at most are on their way (one generating, one waiting on the server); the server
// replaces the waiting one when a newer frame comes (latest wins) and answers the replaced one {dropped: true}.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const IN_FLIGHT = 2; // one generating + one waiting: the model never waits for the network, nothing queues
const FPS_WINDOW_MS = 3000;

function el(tag, attrs = {}, children = []) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
        if (k === "style") Object.assign(e.style, v);
        else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
        else e.setAttribute(k, v);
    }
    for (const c of children) e.append(c);
    return e;
}

class LivePanel {
    constructor(root) {
        this.running = false;
        this.inFlight = 0;
        this.shown = [];
        this.sent = 0;
        this.dropped = 0;
        this.video = el("video", { class: "atelier-live-source", muted: "", playsinline: "", style: { width: "100%" } });
        this.video.muted = true;
        this.canvas = document.createElement("canvas");
        this.out = el("img", { class: "atelier-live-output", style: { width: "100%", imageRendering: "pixelated" } });
        this.fps = el("div", { class: "atelier-live-fps" }, ["–"]);
        this.status = el("div", { class: "atelier-live-status", style: { fontSize: "12px", opacity: 0.8 } });
        this.pose = el("select", { class: "atelier-live-pose" });
        this.size = el("input", { class: "atelier-live-size", type: "number", value: "512", min: "64", max: "1024",
                                  step: "64", style: { width: "5em" } });
        this.file = el("input", { type: "file", accept: "video/*", style: { display: "none" },
                                  onchange: () => this.openFile() });
        const button = (label, cls, fn) => el("button", { class: `p-button p-button-sm ${cls}`, onclick: fn,
                                                          style: { margin: "2px" } }, [label]);
        root.append(
            el("div", { class: "atelier-live", style: { padding: "8px", display: "flex", flexDirection: "column", gap: "6px" } }, [
                el("div", {}, [button("Webcam", "atelier-live-webcam", () => this.openCamera()),
                               button("Video file", "atelier-live-file", () => this.file.click()),
                               button("Stop", "atelier-live-stop", () => this.stop()), this.file]),
                el("label", {}, ["pose ", this.pose, " size ", this.size]),
                this.status, this.fps, this.out, this.video,
            ]));
        this.refresh();
    }

    async refresh() {
        try {
            const s = await (await api.fetchApi("/atelier/live/status")).json();
            const names = ["none", ...s.pose_models], kept = this.pose.value;  // "" before the first fill
            this.pose.replaceChildren(...names.map((m) => el("option", { value: m }, [m])));
            this.pose.value = names.includes(kept) ? kept : (s.pose_models[0] ?? "none");  // the artist's pick stays
            this.status.textContent = s.ready ? `character: ${s.character}`
                : "Queue a workflow with Animate Character once: the panel animates its character.";
        } catch (e) {
            this.status.textContent = `live route unavailable: ${e}`;
        }
    }

    async openCamera() {
        this.stopSource();
        this.video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
        await this.video.play();
        this.start();
    }

    async openFile() {
        const f = this.file.files?.[0];
        if (!f) return;
        this.stopSource();
        this.video.src = URL.createObjectURL(f);
        this.video.loop = true;
        await this.video.play();
        this.start();
    }

    stopSource() {
        const s = this.video.srcObject;
        if (s) s.getTracks().forEach((t) => t.stop());
        this.video.srcObject = null;
    }

    start() {
        this.running = true;
        this.shown = [];
        this.refresh();
        for (let i = this.inFlight; i < IN_FLIGHT; i++) this.sendNext();
    }

    stop() {
        this.running = false;
        this.video.pause();
        this.stopSource();
    }

    grab() {
        const v = this.video, side = Number(this.size.value) || 512;
        if (!v.videoWidth) return null;
        const scale = Math.min(1, side / Math.max(v.videoWidth, v.videoHeight));
        this.canvas.width = Math.max(8, Math.round(v.videoWidth * scale / 8) * 8);
        this.canvas.height = Math.max(8, Math.round(v.videoHeight * scale / 8) * 8);
        this.canvas.getContext("2d").drawImage(v, 0, 0, this.canvas.width, this.canvas.height);
        return new Promise((res) => this.canvas.toBlob(res, "image/jpeg", 0.85));
    }

    async sendNext() {
        if (!this.running) return;
        this.inFlight++;
        try {
            const blob = await this.grab();
            if (!blob) { await new Promise((r) => setTimeout(r, 50)); return; }
            this.sent++;
            const q = `pose=${encodeURIComponent(this.pose.value || "none")}&size=${Number(this.size.value) || 512}`;
            const r = await api.fetchApi(`/atelier/live/frame?${q}`, { method: "POST", body: blob,
                                                                      headers: { "Content-Type": "image/jpeg" } });
            const data = await r.json();
            if (!r.ok) { this.status.textContent = data.error ?? `HTTP ${r.status}`; this.running = false; return; }
            if (data.dropped) { this.dropped++; return; }
            this.show(data);
        } catch (e) {
            this.status.textContent = String(e);
            this.running = false;
        } finally {
            this.inFlight--;
            if (this.running) this.sendNext();
        }
    }

    show(data) {
        const now = performance.now();
        this.out.src = data.image;
        this.shown.push(now);
        while (this.shown.length && now - this.shown[0] > FPS_WINDOW_MS) this.shown.shift();
        const span = (this.shown.at(-1) - this.shown[0]) / 1000;
        const delivered = this.shown.length > 1 && span > 0 ? (this.shown.length - 1) / span : 0;
        this.delivered = delivered;
        this.modelFps = data.model_fps;
        this.frames = data.frame + 1;
        this.fps.textContent = `${delivered.toFixed(2)} fps shown · model ${data.model_fps ?? "–"} fps · ` +
            `frame ${data.frame + 1} (${data.mode}) · dropped ${this.dropped}`;
    }
}

app.registerExtension({
    name: "atelier.live",
    async setup() {
        const manager = app.extensionManager;
        const mount = (root) => { root.atelierLive ??= new LivePanel(root); window.atelierLivePanel = root.atelierLive; };
        if (typeof manager?.registerSidebarTab === "function") {
            manager.registerSidebarTab({ id: "atelier-live", icon: "pi pi-video", title: "Atelier Live",
                                         tooltip: "Live character: webcam or video → pose → character",
                                         type: "custom", render: mount });
        } else { // older frontends: a floating panel
            const root = el("div", { class: "atelier-live-floating", style: { position: "fixed", right: "8px",
                bottom: "8px", width: "320px", background: "var(--comfy-menu-bg)", zIndex: 1000 } });
            document.body.append(root);
            mount(root);
        }
    },
});
