from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.cli._options import Force, MetricsOut, execute


def discover_cluster(
    hosts: Annotated[Optional[list[str]], typer.Argument(help="localhost, gpu-box, 10.0.0.5, [fe80::1], user@host, "
                                                         "host:2222, user@host:2222, or ssh config names.")] = None,
    hosts_file: Annotated[Optional[Path], typer.Option(help="One host spec per line ('#' comments).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Allowlist policy (default: the cluster.yaml shipped "
                                                   "with itera).")] = None,
    ssh_config: Annotated[Optional[Path], typer.Option(help="ssh config file to use (ssh -F); default: ssh's own.")] = None,
    timeout: Annotated[float, typer.Option(help="ssh ConnectTimeout per host, seconds.")] = 5.0,
    deadline: Annotated[float, typer.Option(help="Overall deadline for all probes, seconds.")] = 60.0,
    launch: Annotated[str, typer.Option(metavar="COMMAND", help="itera command the plan runs on every node.")] = "distill --help",
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Processes per node (default: GPUs, else 1).")] = None,
    rdzv_port: Annotated[int, typer.Option(help="Rendezvous port on the first host.")] = 29500,
    out: Annotated[Optional[Path], typer.Option(help="Write the inventory and plan as JSON here.")] = None,
    hostfile: Annotated[Optional[Path], typer.Option(help="Write a hostfile (host slots=N) here.")] = None,
    force: Force = False,
    metrics_out: MetricsOut = None,
) -> None:
    """Inventory the machines you can reach over SSH and plan a torchrun launch across them.

    Hosts outside the allowlist are refused without a connection; the rest are probed in parallel
    (ssh BatchMode, accept-new host keys, your own keys and ssh config; the probe program goes to
    `python3 -` on stdin). Unreachable hosts are reported and do not fail the others.

    Examples:

      itera discover-cluster localhost gpu-box alice@10.0.0.5:2222

      itera discover-cluster --hosts-file hosts.txt \\
        --launch "distill --teacher t --student half --data d.txt --out s"
    """
    from itera.jobs.cluster import DiscoverOptions, run_discover

    opts = DiscoverOptions(commands=("distill", "dpo-train"), hosts=list(hosts or []), hosts_file=hosts_file,
                           config=config, ssh_config=ssh_config, timeout=timeout, deadline=deadline, launch=launch, nproc_per_node=nproc_per_node,
                           rdzv_port=rdzv_port, out=out, hostfile=hostfile, force=force)
    execute("discover-cluster", run_discover, opts.validate(), None, metrics_out, summary=_table)


def _table(console, metrics: dict) -> None:
    rows = []
    for h in metrics["hosts"]:
        i = h["info"] or {}
        gpus = ", ".join(g["name"] for g in i.get("gpus") or []) or ("-" if i else "")
        mem = f"{i['memory_bytes'] / 2**30:.1f}" if i.get("memory_bytes") else ""
        rows.append([h["spec"], h["status"], i.get("cpus", ""), mem, gpus, i.get("python", ""), i.get("torch") or "",
                     h["error"] or ""])
    console.table("discover-cluster", ["host", "status", "cpus", "memory GiB", "GPUs", "python", "torch", "note"], rows)
    for n in metrics["plan"].get("nodes", []):
        console.log(f"node {n['node_rank']} ({n['host']}): {n['command']}")
