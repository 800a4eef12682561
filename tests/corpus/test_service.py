"""The service survives and loses nothing: a soak of mixed prompts (server RSS), Stop at random points, two
clients at once, and a published third-party API client running every shipped API workflow.

Same server as the corpus (one per test process); the tiny models come from tests/harness/workflow_inputs.py.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from pathlib import Path

import psutil
import pytest

from tests.corpus.test_corpus import bg, combine, export, flux, place, sam2
from tests.harness.comfy_server import ComfyClient, WsListener, load_api_workflow
from tests.harness.workflow_inputs import edits_for

log = logging.getLogger("atelier.tests.corpus")
MIB = 1024**2
REPO_ROOT = Path(__file__).resolve().parents[2]
API_DIR = REPO_ROOT / "workflows" / "api"
SOAK_PROMPTS, SOAK_WARMUP, SOAK_MAX_GROWTH = 50, 10, 300 * MIB


@pytest.fixture(scope="module")
def c(corpus_models):
    return corpus_models


def rss(server) -> int:
    """The server's resident memory (its process and any children)."""
    proc = psutil.Process(server.proc.pid)
    return proc.memory_info().rss + sum(ch.memory_info().rss for ch in proc.children(recursive=True))


def soak_prompt(c, i: int) -> dict:
    """Prompt i of the soak: stages in turn, each with its own seed / settings."""
    kind = i % 6
    if kind == 0:
        return flux(c, image=(32 + 16 * (i % 3), 32, 1), mask=(1.0, 32 + 16 * (i % 3), 32, 1), seed=i)
    if kind == 1:
        return bg(c, image=(40 + i % 3, 24 + i % 5, 1), mask_threshold=[0.0, 0.3, 0.6][i % 3])
    if kind == 2:
        return sam2(c, points=f"[[{5 + i % 50}, {7 + i % 30}]]")
    if kind == 3:
        return place(c, x=round(0.1 + 0.8 * (i % 7) / 7, 2), feather=i % 5)
    if kind == 4:
        return combine(c, order=",".join(str(1 + (i + k) % 3) for k in range(3)))
    return export(c, format=["zip", "png", "psd"][i % 3], filename_prefix=f"corpus/soak_{i}")


def test_soak_rss_growth(client, comfy_server, c):
    """50 prompts of mixed stages back to back: the server's RSS after warm-up grows at most 300 MiB."""
    ids, samples = [], []
    for i in range(SOAK_PROMPTS):
        ids.append(client.queue(soak_prompt(c, i)))
    for n, pid in enumerate(ids):
        entry = client.wait(pid, timeout=600)
        assert client.succeeded(entry), f"soak prompt {n}: {client.error_message(entry)}"
        samples.append(rss(comfy_server))
    base, peak, end = samples[SOAK_WARMUP - 1], max(samples[SOAK_WARMUP:]), samples[-1]
    log.info("soak: RSS %.0f MiB after warm-up, %.0f MiB peak, %.0f MiB at the end (growth %.0f MiB)",
             base / MIB, peak / MIB, end / MIB, (end - base) / MIB)
    log.info(f"soak RSS: warm {base / MIB:.0f} MiB, peak {peak / MIB:.0f} MiB, end {end / MIB:.0f} MiB, "
          f"growth {(end - base) / MIB:+.0f} MiB")
    assert end - base <= SOAK_MAX_GROWTH, (base, end)


# ------------------------------------------------------------------------------------------------- interrupts

STOP_POINTS = ("loading", "step", "decoding", "export")


def digest(client: ComfyClient, entry: dict, node: str) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in client.images(entry, node))).hexdigest()


def output_files(base: Path) -> set:
    return {p for p in (base / "output").rglob("*") if p.is_file()}


def stop_prompt(c, seed: int, slicing: bool = False) -> dict:
    """FLUX Fill (24 steps, 96²) then Export Layers: every stop point is in one prompt."""
    p = flux(c, image=(96, 96, 1), mask=(1.0, 96, 96, 1), steps=24, seed=seed,
             loader=dict(attention_slicing=slicing))
    fill_id = node_id(p, "AtelierFluxFill")
    p["90"] = {"class_type": "AtelierExportLayers", "inputs": {
        "layers": [fill_id, 0], "alphas": [node_id(p, "ImageToMask"), 0], "format": "psd",
        "filename_prefix": f"corpus/stop_{seed}", "layer_names": ""}}
    return p


def node_id(prompt: dict, class_type: str) -> str:
    return next(k for k, n in prompt.items() if n["class_type"] == class_type)


def test_interrupts_at_random_points(client, comfy_server, comfy_base, c):
    """20 Stops at seeded random points (loading, step k, decoding, export): each ends promptly, leaves no
    half-written file, and the next prompt gives the same pixels as an undisturbed run of it."""
    rng = random.Random(15)
    ws = WsListener(comfy_server.url, client.client_id)
    results = []
    try:
        ws.wait_for("status", timeout=10)
        reference = {}
        for trial in range(20):
            point = STOP_POINTS[trial % 4]
            seed = rng.randrange(3)
            good = stop_prompt(c, seed)
            if seed not in reference:
                entry = client.run(good)
                assert client.succeeded(entry), client.error_message(entry)
                reference[seed] = digest(client, entry, node_id(good, "PreviewImage"))
            # another seed (ComfyUI's cache must not answer); for "loading" other loader settings: a new build
            disturbed = stop_prompt(c, 1000 + trial, slicing=point == "loading")
            if point == "loading":
                client.free(unload_models=True)  # the loader builds again: Stop lands while it loads
            loader, fill = node_id(disturbed, "AtelierFluxFillLoader"), node_id(disturbed, "AtelierFluxFill")
            client.wait_idle()
            before = output_files(comfy_base)
            start = len(ws.messages())
            pid = client.queue(disturbed)
            k = rng.randint(1, 20)

            def at(msg, pid=pid, k=k, point=point):
                d = msg.get("data") or {}
                if d.get("prompt_id") != pid:
                    return False
                if point == "loading":
                    return msg["type"] == "executing" and d.get("node") == loader
                if point == "step":
                    return msg["type"] == "progress" and d.get("node") == fill and d.get("value", 0) >= k
                if point == "decoding":
                    return msg["type"] == "progress" and d.get("node") == fill and d.get("value") == d.get("max")
                return msg["type"] == "executing" and d.get("node") == "90"

            ws.wait_for(at, timeout=300, start=start)
            t0 = time.monotonic()
            client.interrupt(pid)
            entry = client.wait(pid, timeout=120)
            took = time.monotonic() - t0
            stopped = client.interrupted(entry)
            results.append((point, k if point == "step" else None, stopped, round(took, 2)))
            assert stopped or client.succeeded(entry), client.error_message(entry)
            assert took < 30, f"{point}: the prompt ran {took:.1f} s after Stop"
            new = output_files(comfy_base) - before
            half = [p for p in new if p.suffix != ".psd" or p.stat().st_size == 0]
            assert not half, f"half-written files after Stop at {point}: {half}"
            if stopped and point != "export":
                assert not new, f"files written after Stop at {point}: {new}"
            again = client.run(good)
            assert client.succeeded(again), client.error_message(again)
            assert digest(client, again, node_id(good, "PreviewImage")) == reference[seed], (
                f"stale state after Stop at {point}")
    finally:
        ws.close()
        log.info("interrupts (point, step k, stopped, seconds to end): %s", results)
    landed = sum(r[2] for r in results)
    log.info("interrupts: %d of %d stopped, slowest %.2f s", landed, len(results), max(r[3] for r in results))
    assert landed >= 8, f"too few Stops landed: {results}"


# ------------------------------------------------------------------------------------------ concurrent clients


def test_two_clients_interrupt_and_free_see_only_their_own(comfy_server, c):
    """Client A runs a long FLUX Fill; client B queues its own, presses /interrupt (its own prompt id) and /free
    while A's runs. A's prompt succeeds, B's runs after; each websocket carries only its own prompts' events."""
    a, b = ComfyClient(comfy_server.url), ComfyClient(comfy_server.url)
    wa, wb = WsListener(comfy_server.url, a.client_id), WsListener(comfy_server.url, b.client_id)
    try:
        wa.wait_for("status", timeout=10)
        wb.wait_for("status", timeout=10)
        pa = a.queue(flux(c, image=(96, 96, 1), mask=(1.0, 96, 96, 1), steps=12, seed=77, prompt="client a"))
        wa.wait_for(lambda m: m["type"] == "progress" and (m.get("data") or {}).get("prompt_id") == pa, timeout=300)
        pb = b.queue(bg(c, image=(40, 30, 1), mask_threshold=0.25))
        b.interrupt(pb)  # B's own prompt is not the running one: A's must not stop
        b.free(unload_models=True, free_memory=True)
        ea, eb = a.wait(pa, timeout=300), b.wait(pb, timeout=300)
        assert a.succeeded(ea), a.error_message(ea)
        assert b.succeeded(eb), b.error_message(eb)
        wa.wait_for(lambda m: m["type"] == "execution_success", timeout=30)
        wb.wait_for(lambda m: m["type"] == "execution_success", timeout=30)
        seen_a = {(m.get("data") or {}).get("prompt_id") for m in wa.messages() if m["type"] != "status"} - {None}
        seen_b = {(m.get("data") or {}).get("prompt_id") for m in wb.messages() if m["type"] != "status"} - {None}
        assert seen_a == {pa} and seen_b == {pb}, (seen_a, seen_b)
        assert comfy_server.alive()
    finally:
        wa.close()
        wb.close()
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------ third-party client

API_FILES = sorted(API_DIR.glob("*.json"))


@pytest.mark.parametrize("path", API_FILES, ids=[p.name for p in API_FILES])
def test_published_client_runs_every_api_workflow(path, comfy_server, c):
    """comfy-api-simplified (PyPI) queues the shipped API twin with the tiny models set the way its users set
    parameters (by node title), waits on its own websocket and fetches the outputs."""
    from comfy_api_simplified import ComfyApiWrapper, ComfyWorkflowWrapper

    api = ComfyApiWrapper(comfy_server.url)
    wf = ComfyWorkflowWrapper(str(path))
    titles = {n["class_type"]: n["_meta"]["title"] for n in load_api_workflow(path).values()}
    for class_type, values in edits_for(path.name, c).items():
        for name, value in values.items():
            wf.set_node_param(titles[class_type], name, value)
    outputs = [k for k, n in wf.items() if n["class_type"] in ("SaveImage", "PreviewImage", "SaveVideo",
                                                                 "AtelierExportLayers", "PreviewAny")]
    assert outputs, f"{path.name}: no output node"
    prompt_id, _ = asyncio.run(api.queue_prompt_and_wait(wf))
    deadline = time.monotonic() + 300
    while not (history := api.get_history(prompt_id).get(prompt_id)) or not history.get("status"):
        assert time.monotonic() < deadline, f"{path.name}: no history"
        time.sleep(0.5)
    assert history["status"]["status_str"] == "success", history["status"]
    fetched, texts = 0, 0
    for out in history["outputs"].values():
        texts += bool(out.get("text"))
        for ref in out.get("images") or []:
            if isinstance(ref, dict) and "filename" in ref:
                assert api.get_image(ref["filename"], ref.get("subfolder", ""), ref.get("type", "output"))
                fetched += 1
    assert fetched or texts, history["outputs"]
