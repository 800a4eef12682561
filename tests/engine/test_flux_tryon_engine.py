"""FLUX Fill try-on on the tiny FLUX.1 Fill: the composed picture (garment | person crop) through the engine equals
plain diffusers' FluxFillPipeline on that picture, with and without Redux embeddings (FluxPriorReduxPipeline), and
the person picture comes back exact outside the mask."""

from __future__ import annotations

import logging
import pytest
import torch

from atelier import fill, flux_tryon
from atelier.errors import InputError, ModelFileError
from atelier.stage import get
from atelier.types import FluxFillSpec
from tests.harness import tiny_flux

log = logging.getLogger("atelier.tests")

PROMPT = "a denim jacket with a yellow logo"
KW = dict(steps=2, guidance=30.0, seed=4, height=32, margin=0.2)


@pytest.fixture(scope="module")
def redux_files(tmp_path_factory):
    base = tmp_path_factory.mktemp("redux")
    return tiny_flux.build_redux(base / "models", folder=base / "prior")


def _inputs():
    g = torch.Generator().manual_seed(2)
    person = torch.rand(1, 80, 60, 3, generator=g)
    garment = torch.rand(1, 40, 30, 3, generator=g)
    mask = torch.zeros(1, 80, 60)
    mask[:, 30:62, 14:44] = 1.0
    return person, garment, mask


def _plain(tiny_dir, picture, pmask, seed, embeds=None):
    from diffusers import FluxFillPipeline

    pipe = FluxFillPipeline.from_pretrained(str(tiny_dir), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    args = dict(prompt_embeds=embeds.prompt_embeds, pooled_prompt_embeds=embeds.pooled_prompt_embeds) if embeds \
        else dict(prompt=PROMPT)
    out = pipe(image=picture.permute(0, 3, 1, 2), mask_image=pmask.unsqueeze(1), height=picture.shape[1],
               width=picture.shape[2], guidance_scale=30.0, num_inference_steps=2, output_type="pt",
               generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=512, **args).images
    return out.permute(0, 2, 3, 1), pipe


def test_compose_layout():
    person, garment, mask = _inputs()
    picture, pmask, lay = flux_tryon.compose(person, garment, mask, height=32, margin=0.2)
    assert picture.shape[1] == 32 and picture.shape[2] == lay.garment_w + lay.scale_w
    assert lay.garment_w % 16 == 0 and lay.scale_w % 16 == 0
    assert float(pmask[:, :, :lay.garment_w].max()) == 0.0 and float(pmask.max()) == 1.0
    assert (lay.top, lay.left, lay.height, lay.width) == (24, 8, 44, 42)  # box 30:62 × 14:44 grown by 20 %
    with pytest.raises(InputError, match="empty mask"):
        flux_tryon.compose(person, garment, torch.zeros_like(mask))


def test_flux_tryon_equals_fluxfill_on_the_composed_picture(files_diffusers, tiny_dir, clean_registry):
    model = get(fill.STAGE, fill.make_handle(FluxFillSpec(files=files_diffusers), None))
    person, garment, mask = _inputs()
    out = flux_tryon.run(model, person, garment, mask, PROMPT, **KW)
    picture, pmask, lay = flux_tryon.compose(person, garment, mask, height=32, margin=0.2)
    ref, _ = _plain(tiny_dir, picture, pmask, KW["seed"])
    want = flux_tryon.stitch(person, mask, ref, lay)
    d = float((out - want).abs().max())
    log.info(f"FLUX try-on vs FluxFillPipeline on the composed picture: max abs delta {d:.2e}")
    assert d < 1e-4
    outside = (mask[0] == 0)
    assert torch.equal(out[0][outside], person[0][outside])
    assert float((out[0][~outside] - person[0][~outside]).abs().mean()) > 0.01


def test_flux_tryon_with_redux_equals_prior_redux(files_diffusers, tiny_dir, redux_files, tmp_path_factory,
                                                  clean_registry):
    from diffusers import FluxPriorReduxPipeline

    from atelier.tryon import _pil

    model = get(fill.STAGE, fill.make_handle(FluxFillSpec(files=files_diffusers), None))
    rh = flux_tryon.make_redux_handle(flux_tryon.ReduxSpec(redux=str(redux_files["redux"]),
                                                           siglip=str(redux_files["siglip"])))
    redux = flux_tryon.load_redux(rh)
    person, garment, mask = _inputs()
    out = flux_tryon.run(model, person, garment, mask, PROMPT, redux=redux, **KW)
    picture, pmask, lay = flux_tryon.compose(person, garment, mask, height=32, margin=0.2)
    _, plain = _plain(tiny_dir, picture[:, :16, :16], pmask[:, :16, :16], 0)  # a plain pipe for its text encoders
    prior = FluxPriorReduxPipeline.from_pretrained(str(redux_files["redux"].parents[2] / "prior"),
                                                   text_encoder=plain.text_encoder, tokenizer=plain.tokenizer,
                                                   text_encoder_2=plain.text_encoder_2, tokenizer_2=plain.tokenizer_2)
    embeds = prior(image=_pil(garment[0]), prompt=PROMPT)
    ref, _ = _plain(tiny_dir, picture, pmask, KW["seed"], embeds)
    d = float((out - flux_tryon.stitch(person, mask, ref, lay)).abs().max())
    no_redux = flux_tryon.run(model, person, garment, mask, PROMPT, **KW)
    log.info(f"FLUX try-on + Redux vs FluxPriorReduxPipeline + FluxFillPipeline: max abs delta {d:.2e} "
          f"(Redux changes the result by {float((out - no_redux).abs().max()):.2e})")
    assert d < 1e-4 and float((out - no_redux).abs().max()) > 1e-3


def test_redux_files_are_checked(redux_files):
    with pytest.raises(ModelFileError, match="FLUX.1 Redux file"):
        flux_tryon.make_redux_handle(flux_tryon.ReduxSpec(redux=str(redux_files["siglip"]),
                                                          siglip=str(redux_files["siglip"])))
