from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from itera.commands._options import MetricsOut


def discover_cluster(
    hosts: Annotated[Optional[list[str]], typer.Argument(help="localhost, gpu-box, 10.0.0.5, [fe80::1], user@host, "
                                                         "host:2222, user@host:2222, or ssh config names.")] = None,
    hosts_file: Annotated[Optional[Path], typer.Option(help="One host spec per line ('#' comments).")] = None,
    config: Annotated[Optional[Path], typer.Option(help="Allowlist policy (default configs/cluster.yaml).")] = None,
    ssh_config: Annotated[Optional[Path], typer.Option(help="ssh config file to use (ssh -F); default: ssh's own.")] = None,
    timeout: Annotated[float, typer.Option(help="ssh ConnectTimeout per host, seconds.")] = 5.0,
    deadline: Annotated[float, typer.Option(help="Overall deadline for all probes, seconds.")] = 60.0,
    launch: Annotated[str, typer.Option(help="itera command the plan runs on every node.")] = "distill --help",
    nproc_per_node: Annotated[Optional[int], typer.Option(help="Processes per node (default: GPUs, else 1).")] = None,
    rdzv_port: Annotated[int, typer.Option(help="Rendezvous port on the first host.")] = 29500,
    out: Annotated[Optional[Path], typer.Option(help="Write the inventory and plan as JSON here.")] = None,
    hostfile: Annotated[Optional[Path], typer.Option(help="Write a hostfile (host slots=N) here.")] = None,
    metrics_out: MetricsOut = None,
) -> None:
    """Inventory the machines you can reach over SSH and plan a torchrun launch across them.

    Hosts outside the allowlist are refused without a connection; the rest are probed in parallel
    (ssh BatchMode, accept-new host keys, your own keys and ssh config; the probe program goes to
    `python3 -` on stdin). Unreachable hosts are reported and do not fail the others.
    """
    from itera import record
    from itera.cluster import Policy, as_dicts, discover, launch_plan, parse_host_spec
    from itera.errors import UsageError

    specs_text = list(hosts or [])
    if hosts_file is not None:
        if not hosts_file.is_file():
            raise UsageError(f"--hosts-file {hosts_file} does not exist")
        specs_text += [ln.strip() for ln in hosts_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    if not specs_text:
        raise UsageError("no hosts: pass host specs (e.g. localhost user@gpu-box:2222) or --hosts-file FILE")
    if timeout <= 0 or deadline <= 0 or (nproc_per_node is not None and nproc_per_node < 1):
        raise UsageError("--timeout and --deadline must be positive and --nproc-per-node at least 1")
    specs = [parse_host_spec(s) for s in specs_text]  # every spec is checked before anything runs
    policy = Policy.load(config)
    run = record.Run("discover-cluster")
    results = discover(specs, policy, timeout=timeout, deadline=deadline, ssh_config=ssh_config)
    plan = launch_plan(results, launch, nproc_per_node, rdzv_port)
    inventory = {"hosts": as_dicts(results), "plan": plan}
    _table(results)
    for node in plan.get("nodes", []):
        print(f"node {node['node_rank']} ({node['host']}): {node['command']}", file=sys.stderr)
    artifact = None
    if out is not None:
        record.write_text_atomic(out, json.dumps(inventory, indent=2) + "\n")
        artifact = record.describe_artifact(out, "inventory", "json")
    if hostfile is not None and plan.get("hostfile"):
        record.write_text_atomic(hostfile, plan["hostfile"])
    up = [r for r in results if r.status == "reachable"]
    metrics = {
        "hosts_reachable": len(up), "hosts_unreachable": sum(r.status == "unreachable" for r in results),
        "hosts_refused": sum(r.status == "refused" for r in results),
        "total_cpus": sum(r.info.get("cpus") or 0 for r in up),
        "total_gpus": sum(len(r.info.get("gpus") or []) for r in up),
        "total_memory_bytes": sum(r.info.get("memory_bytes") or 0 for r in up),
        **inventory,
    }
    params = {"hosts": specs_text, "config": str(config) if config else None, "ssh_config": str(ssh_config) if ssh_config else None,
              "timeout": timeout, "deadline": deadline, "launch": launch, "nproc_per_node": nproc_per_node,
              "rdzv_port": rdzv_port}
    record.emit(run.record(artifact, metrics, params), metrics_out=metrics_out)


def _table(results) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="discover-cluster")
    for c in ("host", "status", "cpus", "memory GiB", "GPUs", "python", "torch", "note"):
        t.add_column(c)
    for r in results:
        i = r.info or {}
        gpus = ", ".join(g["name"] for g in i.get("gpus") or []) or ("-" if i else "")
        mem = f"{i['memory_bytes'] / 2**30:.1f}" if i.get("memory_bytes") else ""
        t.add_row(r.spec, r.status, str(i.get("cpus", "")), mem, gpus, i.get("python", ""), i.get("torch") or "",
                  r.error or "")
    Console(stderr=True).print(t)
