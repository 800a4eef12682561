"""Fixtures of the engine tier (tests/engine, and tests/gpu's tiny model): one tiny random FLUX.1 Fill model per
session, in both on-disk layouts, and an empty model registry. Loaded as a pytest plugin by tests/conftest.py.

The model is written once (diffusers folder + ComfyUI-style single files made with ComfyUI's own key converters)
and shared by every engine test. ``reference`` runs plain diffusers on the diffusers folder, the way
``atelier.fill._run_one`` calls the pipeline, so parity tests compare the engine with an independent run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atelier.registry import REGISTRY
from atelier.types import FluxFillFiles
from tests.harness import tiny_flux


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A FluxFillPipeline folder (save_pretrained layout) with tiny random weights."""
    return tiny_flux.build_diffusers(tmp_path_factory.mktemp("tiny_flux") / "FLUX.1-Fill-tiny")


@pytest.fixture(scope="session")
def single_files(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """The same weights as ComfyUI single files: transformer, clip_l, t5xxl, vae, plus both tokenizer folders."""
    models = tmp_path_factory.mktemp("models")
    paths = dict(tiny_flux.export_single_files(tiny_dir, models))
    paths["clip_tokenizer"], paths["t5_tokenizer"] = tiny_flux.tokenizer_dirs()
    return paths


@pytest.fixture(scope="session")
def files_diffusers(tiny_dir) -> FluxFillFiles:
    return FluxFillFiles(layout="diffusers", path=str(tiny_dir))


@pytest.fixture(scope="session")
def files_single(single_files) -> FluxFillFiles:
    return FluxFillFiles(
        layout="single_file", path=str(single_files["transformer"]), clip_l=str(single_files["clip_l"]),
        t5xxl=str(single_files["t5xxl"]), vae=str(single_files["vae"]),
        clip_tokenizer=str(single_files["clip_tokenizer"]), t5_tokenizer=str(single_files["t5_tokenizer"]))


@pytest.fixture(scope="session")
def reference(tiny_dir):
    """``run(image BHWC, mask BHW, prompt, steps, guidance, seed) -> BHWC``: plain diffusers, no Atelier code."""
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def run(image: torch.Tensor, mask: torch.Tensor, prompt: str, steps: int, guidance: float,
            seed: int) -> torch.Tensor:
        with torch.inference_mode():
            out = pipe(
                prompt=prompt, image=image.permute(0, 3, 1, 2).contiguous(), mask_image=mask.unsqueeze(1),
                height=image.shape[1], width=image.shape[2], guidance_scale=guidance, num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=512, output_type="pt",
            ).images
        return out.permute(0, 2, 3, 1).float()

    return run


@pytest.fixture
def clean_registry():
    """An empty model registry before and after the test (tests must not see each other's models)."""
    REGISTRY.release_all()
    yield REGISTRY
    REGISTRY.release_all()
