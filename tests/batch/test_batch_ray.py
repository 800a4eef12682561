"""The batch runner on a local Ray cluster with CPU ComfyUI servers and the tiny FLUX Fill (64×64, 1 step).

* 60 rows on 1, 2 and 3 servers: every output exactly once, pixels equal to the 1-server run (items/s logged).
* a server killed by pid mid-batch (servers the runner owns, restarted by Ray): nothing lost, nothing twice.
* the runner killed mid-batch (SIGKILL) and rerun: it redoes only the unfinished rows.
* bad rows (missing file, unknown node id, a value ComfyUI rejects, a picture that fails to load): each reported
  with ComfyUI's own error, the rest runs.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from atelier.batch.runner import BatchConfig, run_batch

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_fill_inpaint.json"
N_ITEMS = 60
SETS = {"3.steps": "1"}
log = logging.getLogger("atelier.tests.batch")
FIGURES: dict = {}


def make_table(folder: Path, n: int = N_ITEMS, pictures: int = 12, size: int = 64) -> Path:
    """`pictures` 64×64 RGBA pictures (transparent = repaint, at a different place in each) and n rows pairing
    them with a seed and a prompt each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for k in range(pictures):
        rgba = np.dstack([rng.integers(0, 256, (size, size, 3), dtype=np.uint8), np.full((size, size), 255, np.uint8)])
        rgba[16:48, 8 + k: 40 + k, 3] = 0
        Image.fromarray(rgba, "RGBA").save(folder / f"pic{k:02d}.png")
        names.append(f"pic{k:02d}.png")
    lines = ["id,1.image,3.seed,3.prompt"] + [f"row{i:03d},{names[i % pictures]},{i},a vase number {i}"
                                              for i in range(n)]
    (folder / "table.csv").write_text("\n".join(lines) + "\n")
    return folder / "table.csv"


def pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def rows(out: Path) -> dict:
    db = sqlite3.connect(out / "manifest.sqlite")
    db.row_factory = sqlite3.Row
    try:
        return {r["id"]: dict(r) for r in db.execute("SELECT * FROM items")}
    finally:
        db.close()


def assert_exactly_once(out: Path, ids) -> None:
    """Every row done with one output named after it, and no other picture in the folder."""
    got = rows(out)
    assert {i: r["state"] for i, r in got.items()} == dict.fromkeys(ids, "done")
    assert all(json.loads(r["outputs"]) == [f"{i}.png"] for i, r in got.items())
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{i}.png" for i in ids)
    assert not list(out.glob(".*.tmp"))


def cfg(out: Path, table: Path, **kw) -> BatchConfig:
    return BatchConfig(workflow=str(WORKFLOW), table=str(table), out=str(out),
                       sets={"2.model": kw.pop("model"), **SETS}, progress=False, **kw)


@pytest.fixture(scope="module")
def table_csv(tmp_path_factory) -> Path:
    return make_table(tmp_path_factory.mktemp("batch_table"))


@pytest.fixture(scope="module")
def reference(ray_cluster, servers, tiny_flux, table_csv, tmp_path_factory):
    """The whole table on one server: the pixels every other run must reproduce."""
    out = tmp_path_factory.mktemp("batch_ref")
    s = run_batch(cfg(out, table_csv, servers=[servers[0].url], model=tiny_flux["choice_diffusers"]))
    FIGURES[1] = (s["items_per_s"], s["items_per_s_steady"])
    log.info("1 server: %s items/s, %s steady (%d items, %.1f s)", s["items_per_s"], s["items_per_s_steady"],
             s["ran_this_run"], s["seconds_running"])
    ids = [f"row{i:03d}" for i in range(N_ITEMS)]
    assert_exactly_once(out, ids)
    return {i: pixels(out / f"{i}.png") for i in ids}


def assert_same_pixels(out: Path, reference: dict) -> None:
    diff = {i: int(np.abs(pixels(out / f"{i}.png").astype(int) - ref.astype(int)).max()) for i, ref in reference.items()}
    assert max(diff.values()) == 0, {i: d for i, d in diff.items() if d}


@pytest.mark.parametrize("n", [2, 3])
def test_many_servers_give_every_output_once_and_the_single_server_pixels(n, reference, servers, tiny_flux,
                                                                        table_csv, tmp_path):
    s = run_batch(cfg(tmp_path, table_csv, servers=[x.url for x in servers[:n]], model=tiny_flux["choice_diffusers"]))
    FIGURES[n] = (s["items_per_s"], s["items_per_s_steady"])
    log.info("%d servers: %s items/s, %s steady (%d items, %.1f s); per server %s", n, s["items_per_s"],
             s["items_per_s_steady"], s["ran_this_run"], s["seconds_running"], {x["name"]: x["done"] for x in s["servers"]})
    assert s["ran_this_run"] == N_ITEMS and s["counts"]["done"] == N_ITEMS
    assert_exactly_once(tmp_path, reference)
    assert all(r["runs"] == 1 and r["attempts"] == 1 for r in rows(tmp_path).values())
    assert sum(x["done"] for x in s["servers"]) == N_ITEMS and all(x["done"] > 0 for x in s["servers"])
    assert_same_pixels(tmp_path, reference)
    if n == 3:
        log.info("items/s (overall, steady) by number of servers: %s", FIGURES)
        (tmp_path.parent / "batch_scaling.json").write_text(json.dumps(FIGURES))


def test_a_server_killed_mid_batch_loses_nothing(reference, pack_base, tiny_flux, table_csv, tmp_path):
    """Servers the runner starts itself (Ray actors owning them); one is SIGKILLed after a few items."""
    killed: dict = {}

    def killer():
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and not killed:
            time.sleep(0.3)
            try:
                db = sqlite3.connect(tmp_path / "manifest.sqlite")
                done = db.execute("SELECT COUNT(*) FROM items WHERE state='done'").fetchone()[0]
                srv = {r[0]: r[1] for r in db.execute("SELECT name, pid FROM servers WHERE state IN ('idle')")}
                db.close()
            except sqlite3.Error:
                continue
            if done >= 6 and srv.get("cpu0"):
                os.kill(srv["cpu0"], signal.SIGKILL)
                killed.update(pid=srv["cpu0"], done=done)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    s = run_batch(cfg(tmp_path, table_csv, cpu_servers=2, base_directory=str(pack_base),
                      model=tiny_flux["choice_diffusers"]))
    t.join(timeout=5)
    assert killed, "the server was never killed (the batch ended first?)"
    log.info("killed cpu0 (pid %s) after %s items; summary %s; servers %s", killed["pid"], killed["done"],
             {k: s[k] for k in ("counts", "ran_this_run", "seconds_running")},
             [(x["name"], x["done"], x["restarts"], x["state"]) for x in s["servers"]])
    assert_exactly_once(tmp_path, reference)
    assert_same_pixels(tmp_path, reference)
    got = rows(tmp_path)
    rerun = [i for i, r in got.items() if r["runs"] > 1]
    assert len(rerun) <= 1 and all(got[i]["runs"] == 2 for i in rerun)  # at most the one in flight, once more
    assert all("cpu0 died" in (got[i]["error"] or "") or got[i]["error"] is None for i in rerun)
    # Ray restarted the worker: its __init__ started a second ComfyUI (same log, a second start-up banner)
    log_text = (tmp_path / ".servers" / "cpu0" / "server.log").read_text(errors="replace")
    assert log_text.count("Starting server") >= 2 or log_text.count("Total VRAM") >= 2, log_text[-2000:]


def test_the_runner_killed_mid_batch_resumes_only_unfinished_rows(reference, ray_cluster, servers, tiny_flux,
                                                                  table_csv, tmp_path):
    cmd = [sys.executable, "-m", "atelier", "batch", str(WORKFLOW), str(table_csv), "--out", str(tmp_path),
           "--ray", ray_cluster, "--servers", *[x.url for x in servers], "--no-progress",
           "--set", f"2.model={tiny_flux['choice_diffusers']}", *[f"--set={k}={v}" for k, v in SETS.items()]]
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    done_at_kill = 0
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                done_at_kill = sum(r["state"] == "done" for r in rows(tmp_path).values())
            except sqlite3.Error:
                continue
            if done_at_kill >= 20:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    before = rows(tmp_path)
    done_before = {i for i, r in before.items() if r["state"] == "done"}
    stamps = {i: (tmp_path / f"{i}.png").stat().st_mtime_ns for i in done_before}
    assert 20 <= len(done_before) < N_ITEMS
    r = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    after = rows(tmp_path)
    assert_exactly_once(tmp_path, reference)
    assert_same_pixels(tmp_path, reference)
    assert all(after[i]["runs"] == 1 and (tmp_path / f"{i}.png").stat().st_mtime_ns == stamps[i]
               for i in done_before)                                      # finished rows were not redone
    redone = {i for i, r in after.items() if r["runs"] > before[i]["runs"]}
    assert redone == set(after) - done_before                            # and every other row was
    log.info("runner killed after %d rows; the rerun ran %d rows", len(done_before), len(redone))


def test_bad_rows_are_reported_with_comfyuis_error_and_the_rest_runs(ray_cluster, servers, tiny_flux, table_csv,
                                                                     tmp_path):
    folder = table_csv.parent
    (tmp_path / "broken.png").write_text("not a picture")
    lines = ["id,1.image,3.seed,3.steps,9.seed"]
    lines += [f"good{i},{folder / f'pic{i:02d}.png'},{i},," for i in range(4)]
    lines += [f"missing,{tmp_path / 'nope.png'},1,,",
              f"unknown_node,{folder / 'pic00.png'},1,,5",
              f"rejected,{folder / 'pic00.png'},1,0,",
              f"broken,{tmp_path / 'broken.png'},1,,"]
    (tmp_path / "bad.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    s = run_batch(cfg(out, tmp_path / "bad.csv", servers=[x.url for x in servers[:2]],
                      model=tiny_flux["choice_single"]))
    got = rows(out)
    assert {i: r["state"] for i, r in got.items()} == {**{f"good{i}": "done" for i in range(4)}, "missing": "failed",
                                                       "unknown_node": "failed", "rejected": "failed",
                                                       "broken": "failed"}
    err = {i: got[i]["error"] for i in ("missing", "unknown_node", "rejected", "broken")}
    log.info("bad rows: %s", err)
    assert "input file not found" in err["missing"] and "nope.png" in err["missing"]
    assert "missing the class_type" in err["unknown_node"] and "#9" in err["unknown_node"]
    assert "node 3 (AtelierFluxFill)" in err["rejected"] and "smaller than min" in err["rejected"].lower()
    assert "execution error: node 1 (LoadImage)" in err["broken"]
    assert all(got[i]["attempts"] <= 1 for i in err)                    # ComfyUI's verdicts are not retried
    report = (out / "report.csv").read_text()
    assert all(i in report for i in err) and "missing the class_type" in report
    assert "<img" in (out / "report.html").read_text()
    assert s["counts"] == {"pending": 0, "running": 0, "done": 4, "failed": 4, "skipped": 0}
    # a rerun changes nothing: done rows stay done, failed rows stay failed (until the row changes)
    s2 = run_batch(cfg(out, tmp_path / "bad.csv", servers=[servers[0].url], model=tiny_flux["choice_single"]))
    assert s2["ran_this_run"] == 0 and s2["counts"] == s["counts"]
