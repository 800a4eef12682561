"""VLM captioner nodes: the loader (Qwen2-VL / Qwen2.5-VL / Qwen3-VL folders in models/LLM) and the captioner."""

from __future__ import annotations

from comfy_api.latest import io, ui

from ..atelier import analysis, captioner, prompts
from . import _bridge as bridge
from . import _settings as settings
from ._bridge import VLM


def model_choices() -> list[str]:
    return [name for name, _ in captioner.find_model_folders(bridge.llm_roots())]


class AtelierVLMLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierVLMLoader",
            display_name="VLM Loader (Qwen VL)",
            category="atelier/caption",
            description="Load a Qwen2-VL / Qwen2.5-VL (or Qwen3-VL) model folder from models/LLM, offline, with "
                        "the memory settings of your GPU. Loaded models obey ComfyUI's Unload button.",
            inputs=[
                io.Combo.Input("model", options=model_choices(),
                               tooltip="A Hugging Face model folder in models/LLM (config.json, *.safetensors, "
                                       "tokenizer and preprocessor files), e.g. Qwen2.5-VL-3B-Instruct. Qwen3-VL "
                                       "needs transformers >= 4.57."),
                settings.quantization("the language model quantized (nf4: about a third of the VRAM)"),
                io.Combo.Input("offload", options=list(captioner.VLM_OFFLOADS), default="auto",
                               tooltip="auto = all on the GPU when it fits, else model; none = all on the GPU; "
                                       "model = what fits in the free VRAM goes on the GPU, the rest stays in RAM "
                                       "and streams each token (slower). On the CPU everything runs in RAM."),
                settings.dtype(),
            ],
            outputs=[VLM.Output(display_name="vlm")],
        )

    @classmethod
    def execute(cls, model, quantization, offload, dtype) -> io.NodeOutput:
        path = captioner.resolve_folder(model, bridge.llm_roots())
        spec = captioner.VLMSpec(path=str(path), quantization=quantization, offload=offload, dtype=dtype,
                                 device=bridge.device())
        handle, text = bridge.load_stage(captioner.STAGE, spec)
        return io.NodeOutput(handle, ui=ui.PreviewText(text))


class AtelierCaption(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierCaption",
            display_name="Caption / Analyse Image (VLM)",
            category="atelier/caption",
            description="Ask the VLM about each image: a caption, an inpainting prompt, your own question, or a "
                        "background analysis (light, direction, colours, mood, camera, where an object could go) "
                        "with a FLUX Fill prompt that matches the scene. One prompt per image; Stop works "
                        "mid-generation.",
            inputs=[
                VLM.Input("vlm", tooltip="From VLM Loader."),
                io.Image.Input("image", tooltip="The picture(s) to look at; a batch gives one prompt per image "
                                                "(output lists). Above 1 megapixel it is downscaled first."),
                io.Combo.Input("task", options=list(prompts.TASKS), default="background_analysis",
                               tooltip="background_analysis = JSON analysis + a scene-matching FLUX Fill prompt; "
                                       "caption = a detailed description; inpaint_prompt = a prompt that blends "
                                       "repainted parts into the picture; custom = ask 'instruction'."),
                io.String.Input("instruction", multiline=True, default="",
                                tooltip="Your question about the image, used by task 'custom' (ignored by the "
                                        "other tasks)."),
                io.Combo.Input("language", options=list(prompts.LANGUAGES), default="en",
                               tooltip="Language of the reply (analysis keys stay English). FLUX understands "
                                       "English prompts best."),
                io.Int.Input("max_new_tokens", default=512, min=1, max=8192,
                             tooltip="Most tokens generated per image; the analysis JSON needs about 200–300."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for sampling (temperature > 0); image i of a batch uses seed + i."),
                io.Float.Input("temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy (same image, same text); higher = more varied replies "
                                       "(sampling with top-p 0.9)."),
            ],
            outputs=[
                io.String.Output("prompt", display_name="prompt", is_output_list=True,
                                 tooltip="One prompt per image: for background_analysis a FLUX Fill prompt built "
                                         "from the analysis, else the model's reply."),
                io.String.Output("analysis", display_name="analysis", is_output_list=True,
                                 tooltip="One JSON string per image: scene, lighting, light_direction, palette, "
                                         "mood, camera, placement {x, y, w, h} (0–1, top-left corner), found."),
            ],
        )

    @classmethod
    def execute(cls, vlm, image, task, instruction, language, max_new_tokens, seed, temperature) -> io.NodeOutput:
        prompts.build_instruction(task, language, instruction)  # a bad task/instruction before loading
        with bridge.comfy_progress(max_new_tokens * image.shape[0]) as progress:
            model = bridge.acquire(captioner.STAGE, vlm)
            replies = captioner.caption(model, image, task, language=language, instruction=instruction,
                                        max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
                                        progress=progress)
        texts = [r.prompt for r in replies]
        analyses = [analysis.analysis_json(r.analysis) for r in replies]
        shown = []
        for i, r in enumerate(replies):
            head = f"[{i + 1}/{len(replies)}] " if len(replies) > 1 else ""
            body = r.prompt if task != "background_analysis" else f"{r.prompt}\n\n{analyses[i]}"
            shown.append(head + body)
        return io.NodeOutput(texts, analyses, ui=ui.PreviewText("\n\n".join(shown)))


NODES = [AtelierVLMLoader, AtelierCaption]
