// Caption / Analyse Image: the reply (and, for background_analysis, the analysis JSON) in a read-only box on the
// node after a run. Display only: never saved into widgets_values nor sent with the prompt.
// A new Caption node also starts with its seed on "fixed": with "randomize" every queue changed the seed, so the
// VLM ran again each time although nothing else changed (and with temperature 0 the seed does not matter).
// Saved workflows keep whatever they saved: their value is applied after this.
import { app } from "../../../scripts/app.js";

const NODE = "AtelierCaption";
const WIDGET = "atelier_caption";

function showText(node, text) {
    let widget = node.widgets?.find((w) => w.name === WIDGET);
    if (!widget) {
        widget = app.widgets.STRING(node, WIDGET, ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.classList.add("atelier-caption-text");
        widget.inputEl.style.opacity = 0.8;
        widget.serialize = false;
        widget.options.serialize = false; // not an input of the node: keep it out of the queued prompt
        node.setSize([Math.max(node.size[0], 360), Math.max(node.size[1], node.computeSize()[1])]);
    }
    if (widget.value !== text) widget.value = text;
}

app.registerExtension({
    name: "atelier.caption",
    // outputs restored by the frontend (switching back to this workflow's tab): show the last reply again
    onNodeOutputsUpdated(outputs) {
        for (const node of app.graph?.nodes ?? []) {
            const text = node.comfyClass === NODE && (outputs?.[String(node.id)]?.text ?? []).join("\n");
            if (text) showText(node, text);
        }
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== NODE) return;

        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated?.apply(this, arguments);
            const seed = this.widgets?.find((w) => w.name === "seed");
            const control = seed?.linkedWidgets?.[0];
            if (control && control.options?.values?.includes("fixed")) control.value = "fixed";
            return r;
        };

        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = (message?.text ?? []).join("\n");
            if (!text) return;
            showText(this, text);
            this.setDirtyCanvas(true, true);
        };
    },
});
