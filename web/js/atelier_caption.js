// A new Caption node starts with its seed on "fixed": with "randomize" every queue changed the seed, so the VLM ran
// again each time although nothing else changed (and with temperature 0 the seed does not matter). Saved
// workflows keep whatever they saved: their value is applied after this. (The reply shows through atelier_text.js.)
import { app } from "../../../scripts/app.js";
import { chainCallback } from "./atelier_common.js";

app.registerExtension({
    name: "atelier.caption",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (nodeData.name !== "AtelierCaption") return;
        chainCallback(nodeType.prototype, "onNodeCreated", function () {
            const control = this.widgets?.find((w) => w.name === "seed")?.linkedWidgets?.[0];
            if (control && control.options?.values?.includes("fixed")) control.value = "fixed";
        });
    },
});
