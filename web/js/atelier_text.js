// Shows the text an Atelier node returns (e.g. what the FLUX Fill loader resolved: dtype, offload, fallbacks)
// in a read-only box on the node after it runs. `showText` is shared with the layer and caption extensions.
import { app } from "../../../scripts/app.js";

const NODES = new Set(["AtelierFluxFillLoader"]);

// A read-only text box `name` on the node (made on first use; class `<name with dashes>-text`), showing `text`.
// Display only: never saved into widgets_values nor sent as an input with the prompt.
export function showText(node, text, name = "atelier_info") {
    let widget = node.widgets?.find((w) => w.name === name);
    if (!widget) {
        widget = app.widgets.STRING(node, name, ["STRING", { multiline: true }], app).widget;
        widget.inputEl.readOnly = true;
        widget.inputEl.classList.add(`${name.replaceAll("_", "-")}-text`);
        widget.inputEl.style.opacity = 0.7;
        widget.serialize = false; // not in widgets_values
        widget.options.serialize = false; // not in the queued prompt
        node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    }
    if (widget.value !== text) widget.value = text;
    return widget;
}

app.registerExtension({
    name: "atelier.text",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!NODES.has(nodeData.name)) return;
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
