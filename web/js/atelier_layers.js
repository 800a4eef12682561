// Layer nodes: show what ran on the node (the loader's settings, the prompt Split used, the files Export wrote),
// and give Export Layers a download button per written file (PSD / PPTX / ZIP are not images the canvas can show).
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";
import { showText } from "./atelier_text.js";

const TEXT_NODES = new Set(["AtelierLayeredLoader", "AtelierSplitLayers", "AtelierExportLayers"]);

function showDownloads(node, files) {
    node.widgets = (node.widgets ?? []).filter((w) => !w.name?.startsWith("atelier_download_"));
    for (const [i, f] of files.entries()) {
        const params = new URLSearchParams({ filename: f.filename, subfolder: f.subfolder ?? "", type: f.type });
        const button = node.addWidget("button", `atelier_download_${i}`, null, () => {
            const a = document.createElement("a");
            a.href = api.apiURL(`/view?${params}`);
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

app.registerExtension({
    name: "atelier.layers",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!TEXT_NODES.has(nodeData.name)) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            onExecuted?.apply(this, arguments);
            const text = (message?.text ?? []).join("\n");
            if (text) showText(this, text);
            if (nodeData.name === "AtelierExportLayers" && message?.atelier_files?.length) {
                showDownloads(this, message.atelier_files);
            }
            this.setDirtyCanvas(true, true);
        };
    },
});
