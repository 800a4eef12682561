// Error hints in the artist's language. Atelier's error messages stay English (searchable, and what bug reports
// quote); when a prompt fails with one of the errors artists hit most, this shows a short hint from the pack's
// locale (locales/<lang>/main.json: atelier.errorHints.<id>) for the frontend's language (Comfy.Locale), as a toast
// next to the English error. English has no hints: the message itself says what to do.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

// id -> what the English message says (atelier/errors.py: "<expected>; got <received>. <fix>")
// (first match wins: the rules for one stage's files come before the general ones their messages would also match)
export const HINT_RULES = [
    ["pose_models_missing", /(\.tflite\b|models\/pose\b)[^;]*; got (no such file|no file at)/],
    ["fastcomposer_missing", /FastComposer checkpoint '[^']*' in models\/fastcomposer; got no such file|; got no such file\. Put it in models\/fastcomposer/],
    ["controlnet_problem", /^[^;]*\bControlNet\b[^;]*; got /],
    ["ip_adapter_problem", /^[^;]*\b(IP-Adapter|CLIP vision)\b[^;]*; got /],
    ["model_not_found", /; got no such (file|folder)\b/],
    ["model_part_missing", /in models\/\S+ \(looked for names containing .*; got none\./],
    ["incomplete_model_folder", /^a complete .* folder|^a loadable .* folder with|with every weight of|^every weight of/],
    ["wrong_model_type", /^an? (FLUX\.1 Fill transformer|FLUX transformer in BFL|\w+Pipeline folder|Qwen2-VL, Qwen2\.5-VL or Qwen3-VL folder|CLIP text encoder|T5 encoder|VAE in LDM|BiRefNet \/ RMBG-2\.0 checkpoint|background-removal model|ONNX model with|SAM ?2|SD1\.5 model;|SDXL checkpoint \(|diffusers SDXL folder|depth-estimation model|FastComposer checkpoint \(keys)/],
    ["damaged_file", /cannot be read|that onnxruntime can read|damaged, incomplete|INVALID_PROTOBUF/],
    ["out_of_memory", /out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED/i],
    ["quantization_needs_gpu", /^a CUDA GPU for quantization/],
    ["package_missing", /the Python package\b|^(transformers|diffusers) (>=|with) /],
    ["mask_size", /^a mask of the image's size|^a mask batch of 1 or/],
    ["points_format", /^(points|negative_points|boxes) (as (a )?JSON|inside the \d+×\d+ image)/],
];

export function hintId(message) {
    const text = String(message ?? "");
    for (const [id, rx] of HINT_RULES) if (rx.test(text)) return id;
    return null;
}

let translations = null;

export async function hintFor(message, locale) {
    const id = hintId(message);
    if (!id) return null;
    translations ??= await api.fetchApi("/i18n").then((r) => r.json()).catch(() => ({}));
    return translations?.[locale]?.atelier?.errorHints?.[id] ?? null;
}

function currentLocale() {
    return app.extensionManager?.setting?.get?.("Comfy.Locale") ?? app.ui?.settings?.getSettingValue?.("Comfy.Locale") ?? "en";
}

app.registerExtension({
    name: "atelier.errorHints",
    setup() {
        api.addEventListener("execution_error", async ({ detail }) => {
            if (!String(detail?.node_type ?? "").startsWith("Atelier")) return;
            const hint = await hintFor(detail?.exception_message, currentLocale());
            if (hint) app.extensionManager?.toast?.add({ severity: "info", summary: "Atelier", detail: hint, life: 30000 });
        });
    },
});
