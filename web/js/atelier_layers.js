// Layer nodes, after a run:
// * Split Into Layers / Load Layers (UI output `atelier_layers`: one temp PNG per layer): every layer on a
//   checkerboard (so transparency shows) with its index (1 = bottom) and name;
// * Export Layers (UI output `atelier_files`): a download button per written file (PSD / PPTX / ZIP are not images
//   the canvas can show).
// Display only: neither is saved into the workflow nor sent with the prompt. The nodes' text shows through
// atelier_text.js.
import { app } from "../../../scripts/app.js";
import { outputHooks, viewURL } from "./atelier_common.js";

const GALLERY = "atelier_layer_gallery";
const CHECKER = "repeating-conic-gradient(#bdbdbd 0% 25%, #f2f2f2 0% 50%) 0 0 / 16px 16px";

function card(layer) {
    const item = document.createElement("figure");
    item.className = "atelier-layer-card";
    item.dataset.index = layer.index;
    item.dataset.name = layer.name;
    Object.assign(item.style, { margin: "0", display: "flex", flexDirection: "column", gap: "2px", minWidth: "0" });

    const thumb = document.createElement("div");
    Object.assign(thumb.style, { background: CHECKER, borderRadius: "3px", overflow: "hidden", border: "1px solid #555",
                                 aspectRatio: `${layer.width} / ${layer.height}` });
    const img = document.createElement("img");
    img.src = viewURL(layer);
    img.alt = layer.name;
    img.draggable = false;
    Object.assign(img.style, { width: "100%", height: "100%", objectFit: "contain", display: "block" });
    thumb.append(img);

    const caption = document.createElement("figcaption");
    caption.className = "atelier-layer-caption";
    caption.textContent = `${layer.index} · ${layer.name}`;
    caption.title = `layer ${layer.index} of ${layer.count}: ${layer.name}`;
    Object.assign(caption.style, { font: "11px sans-serif", color: "#ccc", whiteSpace: "nowrap", overflow: "hidden",
                                   textOverflow: "ellipsis" });
    item.append(thumb, caption);
    return item;
}

function showGallery(node, layers) {
    let widget = node.widgets?.find((w) => w.name === GALLERY);
    if (!widget) {
        const element = document.createElement("div");
        element.className = "atelier-layer-gallery";
        Object.assign(element.style, {
            display: "grid", gridTemplateColumns: "repeat(auto-fill, minmax(88px, 1fr))", gap: "6px",
            alignContent: "start", overflowY: "auto", boxSizing: "border-box", padding: "2px",
        });
        // scrolling the gallery must not zoom the graph underneath
        element.addEventListener("wheel", (e) => e.stopPropagation(), { passive: true });
        widget = node.addDOMWidget(GALLERY, "atelier_layer_gallery", element, {
            serialize: false, // display only: not an input, not in widgets_values
            hideOnZoom: false,
            getMinHeight: () => 150,
        });
        widget.serialize = false;
        node.setSize([Math.max(node.size[0], 340), Math.max(node.size[1], node.computeSize()[1])]);
    }
    const count = layers.length;
    const key = layers.map((l) => `${l.subfolder}/${l.filename}`).join("|");
    if (widget.element.dataset.key === key) return;
    widget.element.replaceChildren(...layers.map((l) => card({ ...l, count })));
    widget.element.dataset.count = count;
    widget.element.dataset.key = key;
}

function showDownloads(node, files) {
    const key = files.map((f) => `${f.type}/${f.subfolder}/${f.filename}`).join("|");
    if (node.atelierDownloads === key) return;
    node.atelierDownloads = key;
    node.widgets = (node.widgets ?? []).filter((w) => !w.name?.startsWith("atelier_download_"));
    for (const [i, f] of files.entries()) {
        const button = node.addWidget("button", `atelier_download_${i}`, null, () => {
            const a = document.createElement("a");
            a.href = viewURL(f);
            a.download = f.filename;
            document.body.append(a);
            a.click();
            a.remove();
        });
        button.label = `Download ${f.filename}`;
        button.serialize = false;
        button.options.serialize = false;
    }
}

function show(node, message) {
    const layers = message?.atelier_layers;
    const files = message?.atelier_files;
    if (Array.isArray(layers) && layers.length) showGallery(node, layers);
    if (Array.isArray(files) && files.length) showDownloads(node, files);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({ name: "atelier.layers", ...outputHooks(show) });
