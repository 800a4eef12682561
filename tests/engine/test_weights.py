"""atelier.weights: the one home of checkpoint reading, file stamps and the key-mismatch report."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from atelier import weights
from atelier.errors import ModelFileError


def test_state_dicts_are_unwrapped_from_training_checkpoints_and_keep_only_tensors(tmp_path):
    sd = {"a.weight": torch.ones(2, 3), "b.bias": torch.zeros(3)}
    torch.save({"state_dict": {"model": sd}, "epoch": 7}, tmp_path / "train.pth")
    save_file(sd, str(tmp_path / "plain.safetensors"))
    torch.save({**sd, "step": 3}, tmp_path / "extra.pt")
    for name in ("train.pth", "plain.safetensors", "extra.pt"):
        got = weights.read_state_dict(tmp_path / name, mmap=name.endswith(".pt"))
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd), name


def test_unreadable_or_tensorless_files_are_model_file_errors_with_the_callers_words(tmp_path):
    (tmp_path / "cut.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelFileError, match=r"readable checkpoint in 'cut\.safetensors'.*cannot be read"):
        weights.read_state_dict(tmp_path / "cut.safetensors")
    torch.save({"epoch": 1}, tmp_path / "empty.pt")
    with pytest.raises(ModelFileError) as e:
        weights.read_state_dict(tmp_path / "empty.pt", what="a SAM 2 checkpoint", fix="Use the official file.")
    assert e.value.expected == "a SAM 2 checkpoint" and "holding a dict without tensors" in e.value.received
    assert e.value.fix == "Use the official file."


def test_mismatch_report_names_missing_unexpected_and_wrong_shapes():
    expected = {"a": (2,), "b": (3, 3), "c.num_batches_tracked": ()}
    found = {"a": torch.zeros(1), "z": torch.zeros(1)}
    assert weights.mismatch_report(expected, found, optional=("num_batches_tracked",)) == \
        "1 missing: b; 1 unexpected: z; 1 wrong shape: a (1,) (expected (2,))"
    assert weights.mismatch_report(expected, {"a": (2,), "b": (3, 3)}, optional=("num_batches_tracked",)) == ""
    many = weights.mismatch_report({f"k{i}": (1,) for i in range(6)}, {})
    assert many == "6 missing: k0, k1, k2, k3, …"


def test_file_stamp_changes_with_the_file_and_is_zero_without_one(tmp_path):
    f = tmp_path / "m.onnx"
    f.write_bytes(b"12345")
    os.utime(f, ns=(10**18, 10**18))
    assert weights.file_stamp(f) == (5, 10**18)
    f.write_bytes(b"123456")
    assert weights.file_stamp(f)[0] == 6
    assert weights.file_stamp(tmp_path / "gone") == (0, 0)
