// Caption / Analyse Image: the reply (and, for background_analysis, the analysis JSON) in a read-only box on the
// node after a run. Display only: never saved into widgets_values nor sent with the prompt.
// A new Caption node also starts with its seed on "fixed": with "randomize" every queue changed the seed, so the
// VLM ran again each time although nothing else changed (and with temperature 0 the seed does not matter).
// Saved workflows keep whatever they saved: their value is applied after this.
import { app } from "../../../scripts/app.js";
import { showText } from "./atelier_text.js";

const NODE = "AtelierCaption";
const WIDGET = "atelier_caption"; // its box has the class atelier-caption-text

app.registerExtension({
    name: "atelier.caption",
    // outputs restored by the frontend (switching back to this workflow's tab): show the last reply again
    onNodeOutputsUpdated(outputs) {
        for (const node of app.graph?.nodes ?? []) {
            const text = node.comfyClass === NODE && (outputs?.[String(node.id)]?.text ?? []).join("\n");
            if (text) showText(node, text, WIDGET);
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
            showText(this, text, WIDGET);
            this.setDirtyCanvas(true, true);
        };
    },
});
