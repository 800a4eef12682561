"""``python -m atelier batch WORKFLOW TABLE --out DIR [where to run] [options]``."""
from __future__ import annotations

import argparse
import logging
import sys

from .runner import BatchConfig, BatchError, dump, run_batch, summary_lines
from .table import TableError, parse_sets

log = logging.getLogger("atelier.batch")

EPILOG = """table: a folder of pictures (one row each), or a .csv / .jsonl with an optional `id` column and
`NODE_ID.INPUT` columns (e.g. 1.image = a file path, uploaded; 3.seed; 3.prompt). Outputs are named from the
row id, the manifest (OUT/manifest.sqlite) records every item: rerun the same command to resume."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atelier batch", description="Run an API-format ComfyUI workflow "
                                "over a table of inputs on many ComfyUI servers, with Ray.", epilog=EPILOG)
    p.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/api/flux_fill_inpaint.json)")
    p.add_argument("table", help="folder of pictures, .csv or .jsonl")
    p.add_argument("--out", required=True, help="output folder (outputs, manifest.sqlite, report.csv/html)")
    where = p.add_argument_group("where to run (any combination)")
    where.add_argument("--servers", nargs="+", default=[], metavar="URL", help="existing ComfyUI servers")
    where.add_argument("--gpus", type=int, default=None, metavar="N",
                       help="start one ComfyUI (with this pack) per GPU, N GPUs (default with --ray: every GPU)")
    where.add_argument("--servers-per-gpu", type=int, default=1, metavar="K",
                       help="K servers share each GPU (Ray fractional GPUs; small models, default 1)")
    where.add_argument("--cpu-servers", type=int, default=0, metavar="N", help="start N CPU ComfyUI servers")
    where.add_argument("--ray", dest="ray_address", default=None, metavar="ADDRESS",
                       help="an existing Ray cluster (ray start --head); default: a local cluster on this machine")
    srv = p.add_argument_group("servers the runner starts")
    srv.add_argument("--comfyui", default=None, help="ComfyUI tree (default: the one this pack is installed in)")
    srv.add_argument("--base-directory", default=None, help="their --base-directory (models, custom_nodes)")
    srv.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                     help="extra ComfyUI argument, repeatable (e.g. --server-arg=--fast)")
    rows = p.add_argument_group("rows")
    rows.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                      help="override for every row (before the row's own), repeatable")
    rows.add_argument("--image-input", default=None, metavar="NODE.INPUT",
                      help="where a folder's pictures go (default: the workflow's only LoadImage)")
    rows.add_argument("--file-input", action="append", default=[], metavar="NODE.INPUT",
                      help="another input whose table values are files to upload, repeatable")
    run = p.add_argument_group("running")
    run.add_argument("--retries", type=int, default=3, help="attempts per item before it is failed (default 3)")
    run.add_argument("--max-restarts", type=int, default=3, help="Ray restarts per server (default 3)")
    run.add_argument("--per-server", type=int, default=1, help="prompts in flight per server (default 1)")
    run.add_argument("--timeout", type=float, default=3600, help="seconds per item (default 3600)")
    run.add_argument("--retry-failed", action="store_true", help="run failed items again")
    run.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster started here")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--no-report", action="store_true")
    run.add_argument("--json", default=None, metavar="FILE", help="also write the summary as JSON")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        cfg = BatchConfig(workflow=args.workflow, table=args.table, out=args.out, servers=args.servers,
                          gpus=args.gpus, cpu_servers=args.cpu_servers, servers_per_gpu=args.servers_per_gpu, ray_address=args.ray_address,
                          comfyui=args.comfyui, base_directory=args.base_directory, server_args=args.server_arg,
                          sets=parse_sets(args.set), image_input=args.image_input, file_inputs=args.file_input,
                          retries=args.retries, max_restarts=args.max_restarts, per_server=args.per_server,
                          item_timeout=args.timeout, retry_failed=args.retry_failed, num_cpus=args.num_cpus,
                          progress=not args.no_progress, report=not args.no_report)
        summary = run_batch(cfg)
    except (BatchError, TableError) as e:
        log.error("%s", e)
        return 2
    for line in summary_lines(summary):
        log.info("%s", line)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(dump(summary))
    c = summary["counts"]
    return 0 if c["pending"] == 0 and c["running"] == 0 and c["failed"] == 0 else 1
