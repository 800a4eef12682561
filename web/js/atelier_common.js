// What the pack's web extensions share (this module registers no extension of its own).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// Every node of the pack: node ids are Atelier<Thing>.
export function isAtelier(type) {
    return typeof type === "string" && type.startsWith("Atelier");
}

// A file of a node's UI output ({filename, subfolder, type}) as a /view URL.
export function viewURL(file) {
    const params = new URLSearchParams({ filename: file.filename, subfolder: file.subfolder ?? "", type: file.type });
    return api.apiURL(`/view?${params}`);
}

// The text a node returned (ui.PreviewText / {"text": [...]} in its UI output); "" when none.
export function messageText(message) {
    const text = message?.text;
    return (Array.isArray(text) ? text : text == null ? [] : [text]).join("\n");
}

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

// `fn` runs after the method the prototype had (another extension's, or the frontend's); the original's result is
// returned.
export function chainCallback(proto, method, fn) {
    const original = proto[method];
    proto[method] = function () {
        const r = original?.apply(this, arguments);
        fn.apply(this, arguments);
        return r;
    };
}

// Outputs the frontend restores (switching back to a workflow's tab, loading one with its outputs): `show(node,
// output)` for every Atelier node of the graph that has one, the way onExecuted shows a fresh run.
export function onRestoredOutputs(outputs, show) {
    for (const node of app.graph?.nodes ?? []) {
        const output = outputs?.[String(node.id)];
        if (output && isAtelier(node.comfyClass)) show(node, output);
    }
}

// The hooks of an extension that shows part of every Atelier node's UI output on the node: `show(node, output)`
// after each run and again when the frontend restores the outputs. Use: registerExtension({name, ...outputHooks(f)}).
export function outputHooks(show) {
    return {
        onNodeOutputsUpdated(outputs) {
            onRestoredOutputs(outputs, show);
        },
        async beforeRegisterNodeDef(nodeType, nodeData) {
            if (!isAtelier(nodeData.name)) return;
            chainCallback(nodeType.prototype, "onExecuted", function (message) {
                show(this, message);
            });
        },
    };
}
