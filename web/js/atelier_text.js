// The text every Atelier node returns (ui.PreviewText: a loader's summary of what it resolved, Caption's reply,
// the prompt Split Into Layers used, the files Export Layers wrote, ...) in a read-only box on the node after a
// run, and again when the frontend restores the outputs. No node list: any Atelier node whose UI output holds text.
import { app } from "../../../scripts/app.js";
import { messageText, outputHooks, showText } from "./atelier_common.js";

function show(node, message) {
    const text = messageText(message);
    if (!text) return;
    showText(node, text);
    node.setDirtyCanvas(true, true);
}

app.registerExtension({ name: "atelier.text", ...outputHooks(show) });
