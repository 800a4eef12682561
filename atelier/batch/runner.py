"""The driver: table → manifest → Ray workers (one per ComfyUI server) → outputs, report.

Nothing lost, nothing twice: an item is claimed in the manifest (``running``) before it is sent, and marked
``done`` only after its output files are in place (written to a temporary name, then renamed over the stable
name, so a kill leaves either the old file or the new one). A rerun of the same command resets what a killed
run left ``running`` and runs only what is not ``done``. Ray owns membership, placement and restarts; this loop
only decides which item goes to which worker (model affinity) and records outcomes.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import table as table_mod
from .manifest import Manifest
from .schedule import Queue

log = logging.getLogger("atelier.batch")


class BatchError(RuntimeError):
    pass


def import_ray():
    try:
        import ray
    except ImportError as e:
        raise BatchError("the batch runner needs Ray, which is not installed: pip install ray  "
                         f"(import failed: {e})") from e
    return ray


@dataclass
class BatchConfig:
    workflow: str
    table: str
    out: str
    servers: list = field(default_factory=list)   # existing ComfyUI URLs
    gpus: Optional[int] = None                    # start one ComfyUI per GPU (None: 0, or every GPU with --ray)
    cpu_servers: int = 0                          # start N CPU ComfyUI servers (tests, CPU machines)
    servers_per_gpu: int = 1                      # >1: several servers share a GPU (Ray fractional GPUs)
    ray_address: Optional[str] = None
    comfyui: Optional[str] = None                 # ComfyUI tree for servers the runner starts
    base_directory: Optional[str] = None          # their --base-directory (models, custom_nodes)
    server_args: list = field(default_factory=list)
    server_env: dict = field(default_factory=dict)
    sets: dict = field(default_factory=dict)
    image_input: Optional[str] = None
    file_inputs: list = field(default_factory=list)
    retries: int = 3                              # attempts per item (server deaths included)
    max_restarts: int = 3                         # Ray restarts of a worker (and its server)
    per_server: int = 1                           # prompts in flight per server (2 overlaps upload/download)
    item_timeout: float = 3600.0
    retry_failed: bool = False
    manifest: Optional[str] = None
    progress: bool = True
    report: bool = True
    num_cpus: Optional[int] = None                # for a local Ray cluster started here


@dataclass
class _Worker:
    name: str
    handle: object
    state: str = "starting"   # starting, idle, busy, restarting, down, dead
    held: Optional[str] = None
    inflight: set = field(default_factory=set)
    ping: object = None
    next_ping: float = 0.0
    failures: int = 0
    restarts: int = 0
    done: int = 0
    pid: Optional[int] = None


def output_name(item_id: str, node: str, index: int, filename: str, single: bool) -> str:
    ext = Path(filename).suffix or ".png"
    return f"{item_id}{ext}" if single else f"{item_id}_{node}-{index}{ext}"


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # .../atelier (the engine package, batch/ inside)


def _code_env(job_started_here: bool) -> dict:
    """How Ray's workers import `atelier`. A job started here ships the package (py_modules, every node of the
    cluster); inside a job someone else started (ray.init before run_batch) the workers find it on PYTHONPATH,
    at the same path as here."""
    if job_started_here:
        return {}
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(
        [str(_package_dir().parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}}


def _forwarded_env(extra: dict) -> dict:
    env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ATELIER_CACHE", "ATELIER_COMFYUI",
                                      "HF_HUB_OFFLINE") if k in os.environ}
    env.update(extra)
    return env


def run_batch(cfg: BatchConfig, stop_after: Optional[int] = None) -> dict:
    """Run (or resume) the batch; returns the summary. `stop_after`: stop dispatching after that many items
    finish in this run (tests)."""
    t_start = time.monotonic()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    workflow = table_mod.load_workflow(cfg.workflow)
    items = table_mod.build_items(workflow, cfg.table, cfg.sets, cfg.image_input, cfg.file_inputs)
    by_id = {it.id: it for it in items}
    manifest = Manifest(cfg.manifest or out / "manifest.sqlite")
    try:
        reset = manifest.sync(items, out, cfg.retry_failed)
        for row in manifest.items("pending"):
            it = by_id.get(row["id"])
            if it is not None and it.problem:
                manifest.fail(it.id, it.problem)
        todo = [r for r in manifest.items("pending") if r["id"] in by_id]
        log.info("batch: %d rows; %d to run (%s); %s", len(items), len(todo),
                 ", ".join(f"{k} {v}" for k, v in reset.items() if v) or "fresh", manifest.counts())
        stats = {"ran": 0, "first_dispatch": None, "ids": set()}
        if todo:
            _drive(cfg, manifest, by_id, todo, stats, stop_after)
        counts = manifest.counts()
        busy = time.monotonic() - (stats["first_dispatch"] or time.monotonic())
        summary = {"counts": counts, "rows": len(items), "ran_this_run": stats["ran"],
                   "seconds": round(time.monotonic() - t_start, 2), "seconds_running": round(busy, 2),
                   "items_per_s": round(stats["ran"] / busy, 3) if busy > 0 and stats["ran"] else None,
                   "items_per_s_steady": steady_rate(manifest, stats["ids"]),
                   "failed": [{"id": r["id"], "error": r["error"]} for r in manifest.items("failed")],
                   "servers": manifest.servers(), "manifest": str(manifest.path)}
        if cfg.report:
            from .report import write_reports

            summary["report"] = write_reports(manifest, out)
        manifest.set_meta("last_summary", {k: v for k, v in summary.items() if k != "servers"})
        return summary
    finally:
        manifest.close()


def _drive(cfg: BatchConfig, manifest: Manifest, by_id: dict, todo: list, stats: dict,
           stop_after: Optional[int]) -> None:
    ray = import_ray()
    from .worker import ServerWorker

    started_ray = False
    if not ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
              "runtime_env": {"py_modules": [str(_package_dir())]}}
        if cfg.ray_address:
            kw["address"] = cfg.ray_address
        elif cfg.num_cpus is not None:
            kw["num_cpus"] = cfg.num_cpus
        ray.init(**kw)
        started_ray = True
    workers: list[_Worker] = []
    try:
        workers = _start_workers(ray, ServerWorker, cfg, started_ray)
        for w in workers:
            manifest.server_state(w.name, "starting")
        _loop(ray, cfg, manifest, by_id, todo, workers, stats, stop_after)
    finally:
        for w in workers:
            try:
                ray.kill(w.handle, no_restart=True)
            except Exception:
                pass
            manifest.server_state(w.name, "stopped" if w.state != "dead" else "dead", done=w.done,
                                  restarts=w.restarts)
        if started_ray:
            ray.shutdown()


def _start_workers(ray, worker_cls, cfg: BatchConfig, job_started_here: bool) -> list:
    gpus = cfg.gpus
    if gpus is None and cfg.ray_address and not cfg.servers and not cfg.cpu_servers:
        gpus = int(ray.cluster_resources().get("GPU", 0))
        if not gpus:
            raise BatchError(f"the Ray cluster at {cfg.ray_address} has no GPU: give --servers or --cpu-servers")
    gpus = gpus or 0
    if gpus and ray.cluster_resources().get("GPU", 0) < gpus:
        raise BatchError(f"--gpus {gpus}: the Ray cluster has {ray.cluster_resources().get('GPU', 0):.0f} GPU(s)")
    if not (cfg.servers or gpus or cfg.cpu_servers):
        raise BatchError("nowhere to run: give --servers URL..., --gpus N, --cpu-servers N or --ray ADDRESS")
    remote = ray.remote(worker_cls)
    common = dict(max_restarts=cfg.max_restarts, max_task_retries=0, max_concurrency=cfg.per_server + 2,
                  runtime_env=_code_env(job_started_here))
    launch = {"comfyui": cfg.comfyui, "work_dir": str(Path(cfg.out).resolve() / ".servers"),
              "base_directory": cfg.base_directory, "extra_args": list(cfg.server_args),
              "env": _forwarded_env(cfg.server_env)}
    workers = []
    for i, url in enumerate(cfg.servers):
        h = remote.options(num_cpus=0, **common).remote(f"s{i}", url=url, item_timeout=cfg.item_timeout)
        workers.append(_Worker(f"s{i}", h))
    for i in range(gpus * max(1, cfg.servers_per_gpu)):
        h = remote.options(num_cpus=0, num_gpus=1 / max(1, cfg.servers_per_gpu), **common).remote(
            f"gpu{i}", launch={**launch, "cpu": False}, item_timeout=cfg.item_timeout)
        workers.append(_Worker(f"gpu{i}", h))
    for i in range(cfg.cpu_servers):
        h = remote.options(num_cpus=0, **common).remote(
            f"cpu{i}", launch={**launch, "cpu": True}, item_timeout=cfg.item_timeout)
        workers.append(_Worker(f"cpu{i}", h))
    return workers


def _read_files(item) -> dict:
    return {key: (Path(p).name, Path(p).read_bytes()) for key, p in item.files.items()}


def _loop(ray, cfg, manifest, by_id, todo, workers, stats, stop_after) -> None:
    from ray.exceptions import ActorDiedError, RayActorError, RayTaskError

    from .progress import Bar

    queue = Queue((r["id"], r["affinity"]) for r in todo)
    inflight: dict = {}   # ObjectRef -> (item_id, worker)
    bar = Bar(len(todo), enabled=cfg.progress)
    finished = 0
    try:
        while len(queue) or inflight:
            now = time.monotonic()
            for w in workers:  # health: first contact, and workers coming back after a restart
                if w.ping is None and w.state in ("starting", "restarting", "down") and now >= w.next_ping:
                    w.ping = w.handle.info.remote()
            live = [w for w in workers if w.state not in ("dead",)]
            if not live:
                raise BatchError("every server is gone (restarts used up); rerun the same command to resume")
            dispatching = stop_after is None or finished + len(inflight) < stop_after
            for w in workers:
                while dispatching and w.state in ("idle", "busy") and len(w.inflight) < cfg.per_server and len(queue):
                    picked = queue.pick(w.held, [o.held for o in workers if o is not w and o.state != "dead"])
                    item_id, key = picked
                    item = by_id[item_id]
                    try:
                        files = _read_files(item)
                    except OSError as e:
                        manifest.fail(item_id, f"cannot read an input file: {e}")
                        bar.update(w.name, failed=True)
                        finished += 1
                        continue
                    manifest.claim(item_id, w.name)
                    ref = w.handle.run_item.remote(item_id, item.prompt, files)
                    inflight[ref] = (item_id, w)
                    w.inflight.add(ref)
                    w.held, w.state = key, "busy"
                    stats["first_dispatch"] = stats["first_dispatch"] or time.monotonic()
                    dispatching = stop_after is None or finished + len(inflight) < stop_after
            if not dispatching and not inflight:
                break
            pings = {w.ping: w for w in workers if w.ping is not None}
            refs = list(inflight) + list(pings)
            bar.set_states({w.name: w.state for w in workers})
            if not refs:
                time.sleep(0.2)
                continue
            ready, rest = ray.wait(refs, num_returns=1, timeout=0.5)
            if ready and rest:  # take everything already finished in one pass (many servers: many per second)
                ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
            for ref in ready:
                if ref in pings:
                    _on_ping(ray, manifest, pings[ref], ref)
                    continue
                item_id, w = inflight.pop(ref)
                w.inflight.discard(ref)
                if not w.inflight and w.state == "busy":
                    w.state = "idle"
                try:
                    result = ray.get(ref)
                except RayActorError as e:  # the worker process died (its server too): Ray restarts it
                    if isinstance(e, ActorDiedError):  # no restart left
                        if w.state != "dead":
                            _dead(manifest, w, e)
                    elif w.state != "dead":
                        w.state, w.ping, w.next_ping, w.held = "restarting", None, time.monotonic() + 1, None
                        manifest.server_state(w.name, "restarting")
                    finished += _retry_or_fail(manifest, queue, by_id[item_id], cfg.retries,
                                               f"server {w.name} died while running it ({type(e).__name__})", bar, w)
                    continue
                except RayTaskError as e:  # ServerDown from an external server, or a bug
                    cause = e.cause if hasattr(e, "cause") else e
                    if type(cause).__name__ == "ServerDown":
                        w.state, w.ping, w.next_ping = "down", None, time.monotonic() + 5
                        manifest.server_state(w.name, "down")
                    finished += _retry_or_fail(manifest, queue, by_id[item_id], cfg.retries,
                                               f"{w.name}: {cause}", bar, w)
                    continue
                if result["status"] == "done":
                    _store(manifest, Path(cfg.out), item_id, result)
                    w.done += 1
                    stats["ran"] += 1
                    stats["ids"].add(item_id)
                    finished += 1
                    bar.update(w.name)
                elif result.get("retry"):
                    finished += _retry_or_fail(manifest, queue, by_id[item_id], cfg.retries, result["error"], bar, w)
                else:
                    manifest.fail(item_id, result["error"], result.get("server"))
                    stats["ran"] += 1
                    finished += 1
                    bar.update(w.name, failed=True)
    finally:
        bar.close()


def _on_ping(ray, manifest, w: _Worker, ref) -> None:
    """A worker's info() came back: it is ready (first start or after a restart), restarting, or dead for good.
    Ray says which: ActorUnavailableError while it restarts, ActorDiedError once its restarts are used up or its
    __init__ failed (a server that does not start)."""
    from ray.exceptions import ActorDiedError, RayActorError

    w.ping = None
    try:
        info = ray.get(ref)
    except ActorDiedError as e:
        _dead(manifest, w, e)
        return
    except RayActorError:  # ActorUnavailableError: restarting
        w.failures += 1
        w.next_ping = time.monotonic() + 1
        return
    except Exception as e:  # ServerDown from an external server: try again later
        w.failures += 1
        w.next_ping = time.monotonic() + 5
        if w.state == "starting" and w.failures > 3:
            w.state = "dead"
            manifest.server_state(w.name, "dead")
            log.error("server %s: %s", w.name, getattr(e, "cause", e))
        return
    if info.get("restarted") and w.state == "restarting":
        w.restarts += 1
    w.failures, w.state, w.pid = 0, "idle", info.get("pid")
    manifest.server_state(w.name, "idle", url=info["url"], pid=info.get("pid"), host=info.get("host"),
                          restarts=w.restarts)


def _dead(manifest, w: _Worker, error) -> None:
    w.state, w.held = "dead", None
    manifest.server_state(w.name, "dead")
    log.error("server %s is gone for good: %s", w.name, str(error).splitlines()[0][:300])


def _retry_or_fail(manifest, queue, item, retries: int, error: str, bar, w) -> int:
    """Put the item back (front of the queue, so another server picks it up now) or fail it; returns 1 when the
    item is finished (failed)."""
    row = manifest.db.execute("SELECT attempts FROM items WHERE id=?", (item.id,)).fetchone()
    if row and row[0] >= retries:
        manifest.fail(item.id, f"gave up after {row[0]} attempts; last error: {error}")
        bar.update(w.name, failed=True)
        return 1
    log.warning("item %s: %s; retrying", item.id, error)
    manifest.release(item.id, error)
    queue.push(item.id, item.affinity, front=True)
    return 0


def _store(manifest: Manifest, out: Path, item_id: str, result: dict) -> None:
    outputs = result["outputs"]
    single = len(outputs) == 1
    names = []
    for node, index, filename, data in outputs:
        name = output_name(item_id, node, index, filename, single)
        write_atomic(out / name, data)
        names.append(name)
    manifest.done(item_id, names, result.get("server"), result.get("seconds", 0.0))


def steady_rate(manifest: Manifest, ids) -> Optional[float]:
    """Items/s once every server has finished its first item of this run (its model loaded): the rows that finished
    after the last server's first finish, over that span. None with too few rows."""
    rows = [r for r in manifest.items("done") if r["id"] in ids and r["finished"]]
    first: dict = {}
    for r in rows:
        first[r["server"]] = min(first.get(r["server"], r["finished"]), r["finished"])
    if not first:
        return None
    t0 = max(first.values())
    later = [r["finished"] for r in rows if r["finished"] > t0]
    return round(len(later) / (max(later) - t0), 3) if len(later) >= 2 else None


def summary_lines(summary: dict) -> list[str]:
    c = summary["counts"]
    lines = [f"batch: {c['done']} done, {c['failed']} failed, {c['skipped']} skipped, {c['pending']} pending "
             f"of {summary['rows']} rows; this run: {summary['ran_this_run']} items in "
             f"{summary['seconds_running']:.1f} s ({summary['items_per_s'] or 0:.2f} items/s; "
             f"{summary['items_per_s_steady'] or 0:.2f} once every server had its model)"]
    for f in summary["failed"]:
        lines.append(f"  failed {f['id']}: {f['error']}")
    for s in summary["servers"]:
        lines.append(f"  server {s['name']} ({s['url']}): {s['done']} items, {s['restarts']} restarts, {s['state']}")
    if summary.get("report"):
        lines.append("report: " + ", ".join(summary["report"].values()))
    return lines


def dump(summary: dict) -> str:
    return json.dumps(summary, indent=1, default=str)
