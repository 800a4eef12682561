// Split Into Layers / Load Layers: after a run, every layer on a checkerboard (so transparency shows) with its
// index (1 = bottom) and name. The node sends the layers as temp PNGs in its UI output (`atelier_layers`).
// Display only: the gallery is never saved into the workflow nor sent with the prompt.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const NODES = new Set(["AtelierSplitLayers", "AtelierLoadLayers"]);
const WIDGET = "atelier_layer_gallery";
const CHECKER = "repeating-conic-gradient(#bdbdbd 0% 25%, #f2f2f2 0% 50%) 0 0 / 16px 16px";

function viewURL(f) {
    const params = new URLSearchParams({ filename: f.filename, subfolder: f.subfolder ?? "", type: f.type });
    return api.apiURL(`/view?${params}`);
}

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
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        const element = document.createElement("div");
        element.className = "atelier-layer-gallery";
        Object.assign(element.style, {
            display: "grid", gridTemplateColumns: "repeat(auto-fill, minmax(88px, 1fr))", gap: "6px",
            alignContent: "start", overflowY: "auto", boxSizing: "border-box", padding: "2px",
        });
        // scrolling the gallery must not zoom the graph underneath
        element.addEventListener("wheel", (e) => e.stopPropagation(), { passive: true });
        widget = node.addDOMWidget(WIDGET, "atelier_layer_gallery", element, {
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

app.registerExtension({
    name: "atelier.layer_gallery",
    // outputs restored by the frontend (switching back to this workflow's tab): show the last run's layers again
    onNodeOutputsUpdated(outputs) {
        for (const node of app.graph?.nodes ?? []) {
            const layers = NODES.has(node.comfyClass) && outputs?.[String(node.id)]?.atelier_layers;
            if (Array.isArray(layers) && layers.length) showGallery(node, layers);
        }
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.has(nodeData.name)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const layers = message?.atelier_layers;
            if (!Array.isArray(layers) || !layers.length) return;
            showGallery(this, layers);
            this.setDirtyCanvas(true, true);
        };
    },
});
