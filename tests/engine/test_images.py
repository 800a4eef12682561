"""Image and mask plumbing: shape checks, mask matching, padding to a multiple, compositing."""

from __future__ import annotations

import pytest
import torch

from atelier.errors import InputError
from atelier.images import (
    Padding,
    check_image,
    check_mask,
    composite,
    match_mask_to_images,
    pad_to_multiple,
    to_bchw,
    to_bhwc,
)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- check_image


def test_check_image_keeps_a_bhwc_batch():
    img = _rand(2, 8, 12, 3)
    out = check_image(img)
    assert out.shape == (2, 8, 12, 3)
    assert out.dtype == torch.float32
    assert torch.equal(out, img)


def test_check_image_adds_the_batch_dimension():
    img = _rand(8, 12, 3)
    out = check_image(img)
    assert out.shape == (1, 8, 12, 3)
    assert torch.equal(out[0], img)


def test_check_image_drops_alpha():
    img = _rand(1, 4, 5, 4)
    out = check_image(img)
    assert out.shape == (1, 4, 5, 3)
    assert torch.equal(out, img[..., :3])


def test_check_image_casts_to_float():
    img = torch.ones(1, 2, 2, 3, dtype=torch.float16)
    assert check_image(img).dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 32, 48, 5), (32, 48), (1, 3, 32, 48), (1, 1, 32, 48, 3)])
def test_check_image_rejects_bad_shapes_and_names_them(shape):
    with pytest.raises(InputError) as e:
        check_image(torch.zeros(shape))
    assert str(list(shape)) in str(e.value)
    assert "[batch, height, width, 3]" in str(e.value)


def test_check_image_rejects_an_empty_batch():
    with pytest.raises(InputError, match="empty batch"):
        check_image(torch.zeros(0, 8, 8, 3))


def test_check_image_rejects_non_tensors():
    with pytest.raises(InputError, match="list"):
        check_image([[0.0]])


def test_check_image_uses_the_input_name():
    with pytest.raises(InputError, match="background"):
        check_image(torch.zeros(2, 2), name="background")


# -------------------------------------------------------------------------------------------- check_mask


def test_check_mask_adds_the_batch_dimension():
    m = _rand(8, 12)
    out = check_mask(m)
    assert out.shape == (1, 8, 12)
    assert torch.equal(out[0], m)


def test_check_mask_accepts_a_trailing_channel():
    m = _rand(2, 8, 12, 1)
    out = check_mask(m)
    assert out.shape == (2, 8, 12)
    assert torch.equal(out, m[..., 0])


def test_check_mask_clamps_to_unit_range_and_floats():
    m = torch.tensor([[[-1.0, 0.5, 2.0]]], dtype=torch.float64)
    out = check_mask(m)
    assert out.dtype == torch.float32
    assert out.tolist() == [[[0.0, 0.5, 1.0]]]


@pytest.mark.parametrize("shape", [(5,), (1, 8, 12, 3), (1, 1, 8, 12, 1)])
def test_check_mask_rejects_bad_shapes_and_names_them(shape):
    with pytest.raises(InputError) as e:
        check_mask(torch.zeros(shape))
    assert str(list(shape)) in str(e.value)
    assert "[batch, height, width]" in str(e.value)


def test_check_mask_rejects_non_tensors():
    with pytest.raises(InputError, match="ndarray|list"):
        check_mask([0.0, 1.0])


# --------------------------------------------------------------------------------- match_mask_to_images


def test_a_mask_of_one_is_broadcast_over_the_batch():
    image = torch.zeros(3, 32, 48, 3)
    mask = _rand(1, 32, 48)
    out = match_mask_to_images(image, mask)
    assert out.shape == (3, 32, 48)
    for i in range(3):
        assert torch.equal(out[i], mask[0])


def test_a_mask_per_image_is_kept():
    image = torch.zeros(2, 32, 48, 3)
    mask = _rand(2, 32, 48)
    assert torch.equal(match_mask_to_images(image, mask), mask)


def test_a_mask_of_another_size_is_refused_with_both_sizes_width_first():
    image = torch.zeros(1, 32, 48, 3)  # 48 wide, 32 high
    mask = torch.zeros(1, 48, 32)  # 32 wide, 48 high
    with pytest.raises(InputError) as e:
        match_mask_to_images(image, mask)
    assert "48×32" in e.value.expected
    assert "32×48" in e.value.received
    assert "48×32" in str(e.value) and "32×48" in str(e.value)


def test_a_mask_batch_that_fits_no_rule_is_refused():
    image = torch.zeros(3, 8, 8, 3)
    mask = torch.zeros(2, 8, 8)
    with pytest.raises(InputError) as e:
        match_mask_to_images(image, mask)
    assert "1 or 3" in e.value.expected
    assert "2" in e.value.received


# ------------------------------------------------------------------------------------------ BHWC <-> BCHW


def test_layout_conversions_are_inverse():
    img = _rand(2, 5, 7, 3)
    bchw = to_bchw(img)
    assert bchw.shape == (2, 3, 5, 7)
    assert torch.equal(bchw[:, 1], img[..., 1])
    assert torch.equal(to_bhwc(bchw), img)


# ----------------------------------------------------------------------------------------- pad_to_multiple


def test_pad_to_multiple_pads_right_and_bottom_to_the_next_multiple():
    image, mask = _rand(2, 30, 45, 3), torch.ones(2, 30, 45)
    img, msk, pad = pad_to_multiple(image, mask, 16)
    assert pad == Padding(height=30, width=45, pad_bottom=2, pad_right=3)
    assert img.shape == (2, 32, 48, 3)
    assert msk.shape == (2, 32, 48)
    assert torch.equal(img[:, :30, :45], image)
    assert torch.equal(msk[:, :30, :45], mask)


def test_pad_to_multiple_replicates_the_edges():
    image, mask = _rand(1, 30, 45, 3, seed=1), torch.zeros(1, 30, 45)
    img, _, _ = pad_to_multiple(image, mask, 16)
    for row in (30, 31):  # bottom rows copy the last row
        assert torch.equal(img[:, row, :45], image[:, 29])
    for col in (45, 46, 47):  # right columns copy the last column
        assert torch.equal(img[:, :30, col], image[:, :, 44])
    assert torch.equal(img[:, 31, 47], image[:, 29, 44])  # corner


def test_pad_to_multiple_never_marks_padding_for_repainting():
    image, mask = _rand(1, 30, 45, 3), torch.ones(1, 30, 45)
    _, msk, _ = pad_to_multiple(image, mask, 16)
    assert float(msk[:, 30:].abs().max()) == 0.0
    assert float(msk[:, :, 45:].abs().max()) == 0.0


def test_padding_crop_restores_the_input():
    image, mask = _rand(1, 30, 45, 3), _rand(1, 30, 45)
    img, msk, pad = pad_to_multiple(image, mask, 16)
    assert torch.equal(pad.crop(img), image)
    assert torch.equal(pad.crop(to_bchw(img), channels_last=False), to_bchw(image))
    assert torch.equal(pad.crop(msk.unsqueeze(-1))[..., 0], mask)


def test_pad_to_multiple_leaves_multiples_alone():
    image, mask = _rand(1, 32, 48, 3), _rand(1, 32, 48)
    img, msk, pad = pad_to_multiple(image, mask, 16)
    assert pad == Padding(32, 48, 0, 0)
    assert torch.equal(img, image) and torch.equal(msk, mask)


@pytest.mark.parametrize("h,w,multiple", [(1, 1, 16), (17, 33, 16), (64, 63, 8), (100, 100, 32)])
def test_pad_to_multiple_reaches_the_smallest_multiple(h, w, multiple):
    img, msk, pad = pad_to_multiple(torch.zeros(1, h, w, 3), torch.zeros(1, h, w), multiple)
    H, W = img.shape[1:3]
    assert H % multiple == 0 and W % multiple == 0
    assert h <= H < h + multiple and w <= W < w + multiple
    assert (pad.pad_bottom, pad.pad_right) == (H - h, W - w)
    assert msk.shape == (1, H, W)


# ---------------------------------------------------------------------------------------------- composite


def test_composite_keeps_the_original_exactly_outside_the_mask():
    original, generated = _rand(2, 16, 16, 3, seed=1), _rand(2, 16, 16, 3, seed=2)
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:12, 3:9] = 1.0
    out = composite(original, generated, mask)
    outside = (mask == 0).unsqueeze(-1).expand_as(out)
    inside = (mask == 1).unsqueeze(-1).expand_as(out)
    assert torch.equal(out[outside], original[outside])
    assert torch.equal(out[inside], generated[inside])


def test_composite_blends_a_soft_mask():
    original, generated = _rand(1, 4, 4, 3, seed=1), _rand(1, 4, 4, 3, seed=2)
    mask = torch.full((1, 4, 4), 0.25)
    out = composite(original, generated, mask)
    torch.testing.assert_close(out, 0.75 * original + 0.25 * generated)


def test_composite_keeps_the_originals_dtype():
    original = _rand(1, 4, 4, 3).double()
    generated = _rand(1, 4, 4, 3, seed=3)
    mask = torch.ones(1, 4, 4)
    out = composite(original, generated, mask)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, generated.double())


def test_to_uint8_gives_back_the_bytes_of_an_8_bit_picture_from_tensors_and_arrays():
    import numpy as np

    from atelier.images import to_uint8

    values = np.arange(256, dtype=np.uint8)
    as_float = torch.from_numpy(values.astype(np.float32) / 255.0)  # what LoadImage makes of 8-bit pixels
    assert np.array_equal(to_uint8(as_float), values)
    assert np.array_equal(to_uint8(as_float.numpy()), values)
    assert np.array_equal(to_uint8(as_float.to(torch.bfloat16)[[0, 255]]), np.array([0, 255], np.uint8))
    assert to_uint8(np.array([-0.5, 1.5, 0.5 / 255])).tolist() == [0, 255, 0]  # clipped; half rounds to even
