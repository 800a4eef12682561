"""The batch runner's pure parts: table → items, manifest states and resume rules, affinity, error texts.
No server, no Ray."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from atelier.batch import comfy, manifest, runner, schedule, table

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = REPO_ROOT / "workflows" / "api" / "flux_fill_inpaint.json"


def _pics(folder: Path, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(n):
        Image.new("RGBA", (16, 16), (10 * k, 0, 0, 255)).save(folder / f"p{k}.png")
        names.append(f"p{k}.png")
    return names


def test_csv_rows_become_prompts_with_typed_overrides(tmp_path):
    names = _pics(tmp_path, 2)
    (tmp_path / "t.csv").write_text("id,1.image,3.seed,3.guidance,3.composite_back,3.prompt,sku\n"
                                    f"a,{names[0]},7,3.5,false,a red vase,X1\n"
                                    f"b,{names[1]},,abc,true,,X2\n")
    wf = table.load_workflow(WORKFLOW)
    items = table.build_items(wf, tmp_path / "t.csv", sets={"3.steps": "1"})
    a, b = items
    assert [a.id, b.id] == ["a", "b"]
    assert a.files == {"1.image": str(tmp_path / names[0])} and a.problem is None
    ins = a.prompt["3"]["inputs"]
    assert (ins["seed"], ins["guidance"], ins["composite_back"], ins["prompt"], ins["steps"]) == \
        (7, 3.5, False, "a red vase", 1)
    # empty cells keep the workflow's value; text that is not a number stays text (ComfyUI will reject it)
    assert b.prompt["3"]["inputs"]["seed"] == wf["3"]["inputs"]["seed"]
    assert b.prompt["3"]["inputs"]["guidance"] == "abc"
    assert a.row["sku"] == "X1" and a.spec_hash != b.spec_hash and a.affinity == b.affinity
    assert wf["3"]["inputs"]["steps"] == 28  # the workflow itself is untouched


def test_unknown_node_is_passed_to_comfyui_and_missing_files_are_problems(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"id": "x", "1.image": "nope.png", "9.seed": 3}) + "\n")
    items = table.build_items(table.load_workflow(WORKFLOW), tmp_path / "t.jsonl")
    assert items[0].prompt["9"] == {"inputs": {"seed": 3}}  # no class_type: ComfyUI names the node in its 400
    assert "input file not found" in items[0].problem and "nope.png" in items[0].problem


def test_folder_table_and_ids(tmp_path):
    _pics(tmp_path / "pics" / "sub", 2)
    items = table.build_items(table.load_workflow(WORKFLOW), tmp_path / "pics")
    assert [it.id for it in items] == ["sub__p0", "sub__p1"]
    assert all(set(it.files) == {"1.image"} for it in items)
    (tmp_path / "d.csv").write_text("id,3.seed\nsame,1\nsame,2\n")
    with pytest.raises(table.TableError, match="repeats row 1"):
        table.build_items(table.load_workflow(WORKFLOW), tmp_path / "d.csv")
    (tmp_path / "n.csv").write_text("1.image,3.seed\npics/sub/p0.png,1\n")
    assert table.build_items(table.load_workflow(WORKFLOW), tmp_path / "n.csv")[0].id == "00001_p0"


def test_ui_workflow_is_refused(tmp_path):
    with pytest.raises(table.TableError, match="UI-format"):
        table.load_workflow(REPO_ROOT / "workflows" / "flux_fill_inpaint.json")


def _items(tmp_path, seeds):
    (tmp_path / "t.csv").write_text("id,3.seed\n" + "".join(f"r{i},{s}\n" for i, s in enumerate(seeds)))
    return table.build_items(table.load_workflow(WORKFLOW), tmp_path / "t.csv")


def test_manifest_resume_rules(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    items = _items(tmp_path, [1, 2, 3, 4, 1])  # r4 repeats r0's inputs
    m = manifest.Manifest(out / "m.sqlite")
    assert m.sync(items, out)["new"] == 4
    assert m.counts() == {"pending": 4, "running": 0, "done": 0, "failed": 0, "skipped": 1}
    assert "same inputs as row r0" in m.items("skipped")[0]["error"]
    assert m.claim("r0", "s0") == 1 and m.claim("r1", "s0") == 1 and m.claim("r2", "s1") == 1
    (out / "r0.png").write_bytes(b"x")
    (out / "r1.png").write_bytes(b"x")
    m.done("r0", ["r0.png"], "s0", 1.0)
    m.done("r1", ["r1.png"], "s0", 1.0)
    m.fail("r3", "boom")
    m.close()
    (out / "r1.png").unlink()                            # an output lost since
    m = manifest.Manifest(out / "m.sqlite")              # "the runner was killed": r2 is still running
    counts = m.sync(items, out)
    assert counts == {"new": 0, "changed": 0, "interrupted": 1, "lost_output": 1, "retry_failed": 0}
    assert {r["id"]: r["state"] for r in m.items()} == {"r0": "done", "r1": "pending", "r2": "pending",
                                                         "r3": "failed", "r4": "skipped"}
    items2 = _items(tmp_path, [9, 2, 3, 4, 1])           # r0's row changed: it runs again, r4 now runs too
    m.sync(items2, out, retry_failed=True)
    assert {r["id"]: r["state"] for r in m.items()} == {"r0": "pending", "r1": "pending", "r2": "pending",
                                                         "r3": "pending", "r4": "pending"}
    m.close()


def test_affinity_queue():
    q = schedule.Queue([("a1", "A"), ("b1", "B"), ("a2", "A"), ("b2", "B"), ("b3", "B"), ("c1", "C")])
    assert q.pick("A", ["B"]) == ("a1", "A")            # keeps its model
    assert q.pick(None, ["A"]) == ("b1", "B")           # a model nobody holds, the biggest group first
    assert q.pick(None, ["A", "B"]) == ("c1", "C")
    assert q.pick("C", ["A", "B"]) == ("b2", "B")       # its model ran out: help the busiest group
    q.push("a9", "A", front=True)
    assert q.pick("A", []) == ("a9", "A") and len(q) == 2


def test_comfyui_errors_are_reported_in_its_words():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"3": {"class_type": "AtelierFluxFill", "dependent_outputs": ["4"],
                                  "errors": [{"type": "value_smaller_than_min", "message": "Value smaller than min",
                                              "details": "steps: 0 < 1"}]}}}
    assert comfy.format_rejection(body) == ("Prompt outputs failed validation; node 3 (AtelierFluxFill): "
                                            "Value smaller than min: steps: 0 < 1")
    assert comfy.format_execution_error({"node_id": "1", "node_type": "LoadImage", "exception_type": "OSError",
                                         "exception_message": "bad file\n"}) == \
        "node 1 (LoadImage): OSError: bad file"
    assert runner.output_name("r1", "4", 0, "x_00001_.png", True) == "r1.png"
    assert runner.output_name("r1", "4", 1, "x_00002_.png", False) == "r1_4-1.png"


def test_import_is_light_and_missing_ray_is_one_clear_error():
    code = ("import sys; import atelier.batch.cli, atelier.batch.runner, atelier.batch.worker, atelier.batch.report;"
            "bad = [m for m in ('torch', 'ray', 'comfy', 'folder_paths', 'diffusers') if m in sys.modules];"
            "assert not bad, bad;"
            "sys.modules['ray'] = None\n"
            "try:\n    atelier.batch.runner.import_ray()\n"
            "except atelier.batch.runner.BatchError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pip install ray" in r.stdout
    r = subprocess.run([sys.executable, "-m", "atelier", "batch", "--help"], cwd=REPO_ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--cpu-servers" in r.stdout
