// Shows the text an Atelier node returns (e.g. what the FLUX Fill loader resolved: dtype, offload, fallbacks)
// in a read-only box on the node after it runs.
import { app } from "../../../scripts/app.js";

const NODES = new Set(["AtelierFluxFillLoader"]);

app.registerExtension({
    name: "atelier.text",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.has(nodeData.name)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = (message?.text ?? []).join("\n");
            if (!text) return;
            let widget = this.widgets?.find((w) => w.name === "atelier_info");
            if (!widget) {
                widget = app.widgets.STRING(this, "atelier_info", ["STRING", { multiline: true }], app).widget;
                widget.inputEl.readOnly = true;
                widget.inputEl.style.opacity = 0.7;
                widget.serialize = false; // display only: never saved into widgets_values
                widget.options.serialize = false; // nor sent as an input with the prompt
            }
            widget.value = text;
            this.setDirtyCanvas(true, true);
        };
    },
});
