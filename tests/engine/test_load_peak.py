"""Loading stays within the weights' bytes in host RAM: the loader reads safetensors through mmap and builds each
part once (no second full copy of the state dict), measured as peak RSS of a fresh process while it loads."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

log = logging.getLogger("atelier.tests")

REPO = Path(__file__).resolve().parents[2]

CHILD = textwrap.dedent('''
    import json, sys, threading, time
    import psutil, torch
    sys.path.insert(0, sys.argv[1])
    from atelier import fill, stage
    from atelier.types import FluxFillFiles, FluxFillSpec
    import diffusers, transformers  # imported before the baseline: library code is not weights
    from diffusers import FluxFillPipeline, FluxTransformer2DModel  # noqa: F401
    from transformers import CLIPTextModel, T5EncoderModel  # noqa: F401
    proc = psutil.Process()
    spec = FluxFillSpec(files=FluxFillFiles("diffusers", sys.argv[2]), dtype=sys.argv[3])
    handle = fill.make_handle(spec)
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = fill.load(handle)
    done.set(); t.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    weights = sum(p.numel() * p.element_size() for m in model.pipe.components.values()
                  if isinstance(m, torch.nn.Module) for p in list(m.parameters()) + list(m.buffers()))
    print(json.dumps({"base": base, "peak": peak[0], "weights": weights}))
''')


@pytest.fixture(scope="module")
def medium_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny FLUX Fill widened to ~0.1 GB of weights (so that load overheads show against the weights), saved
    in fp32 and in bf16: the files in the run dtype, as users keep them (a cast reads the file's bytes too)."""
    import torch

    from tests.harness import tiny_flux

    pipe = tiny_flux.build_pipeline(scale=24)
    root = tmp_path_factory.mktemp("medium")
    pipe.save_pretrained(root / "fp32", safe_serialization=True)
    pipe.to(torch.bfloat16).save_pretrained(root / "bf16", safe_serialization=True)
    return {"fp32": root / "fp32", "bf16": root / "bf16"}


@pytest.mark.parametrize("dtype", ["fp32", pytest.param("bf16", marks=pytest.mark.xfail(
    strict=False, reason="issue 12, open: loading bf16 files in bf16 peaks at 1.4-1.6x the weights (measured 1.42x "
                         "and 1.63x on the same machine, package versions apart): a second copy while "
                         "diffusers/transformers place the tensors; near the 1.1x + 32 MiB line it passes now and then"))])
def test_host_ram_peak_while_loading_is_about_the_weights(medium_dirs, dtype):
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(medium_dirs[dtype]), dtype], capture_output=True,
                         text=True, timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                                      "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["base"]
    log.info(f"{dtype}: weights {r['weights'] / 2**20:.1f} MiB, load peak +{grew / 2**20:.1f} MiB "
          f"({grew / r['weights']:.2f}x)")
    assert r["weights"] > 50 * 2**20
    assert grew <= 1.1 * r["weights"] + 32 * 2**20  # no second full copy (32 MiB: allocator and tokenizer slack)
