"""itera discover-cluster against a real OpenSSH server on 127.0.0.1, strict parsing, the
allowlist, and launch plans (one of them actually launched with torchrun)."""

from __future__ import annotations

import getpass
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, assert_usage_error, run_itera
from itera.jobs.cluster import HostResult, Policy, launch_plan, parse_host_spec, probe_local

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """A throwaway sshd on a free high port with its own host key, user key and known_hosts."""
    if SSHD is None:
        pytest.skip("OpenSSH server not installed (.ci/run installs openssh-server)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "id_ed25519"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host_key\nPidFile {d}/sshd.pid\n"
        f"AuthorizedKeysFile {d}/authorized_keys\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\n")
    marker = d / "pwned"
    (d / "ssh_config").write_text(
        f"Host 8.8.8.8 public-box\n  ProxyCommand touch {marker}\n"
        f"Host alias-box\n  HostName 127.0.0.1\n  Port {port}\n"
        f"Host *\n  IdentityFile {d}/id_ed25519\n  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
        "  LogLevel ERROR\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("sshd did not start: " + proc.stderr.read().decode()[-500:])
    yield {"port": port, "config": d / "ssh_config", "marker": marker, "user": getpass.getuser(), "dir": d}
    proc.terminate()
    proc.wait(timeout=10)


def discover(sshd, *args):
    return run_itera("discover-cluster", "--ssh-config", sshd["config"], *args)


def test_inventory_over_ssh_matches_the_local_probe(sshd):
    spec = f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    rec = discover(sshd, spec, "localhost", "alias-box").record
    hosts = {h["spec"]: h for h in rec["metrics"]["hosts"]}
    local = probe_local()
    for name in (spec, "alias-box", "localhost"):
        assert hosts[name]["status"] == "reachable", hosts[name]
        assert hosts[name]["info"]["cpus"] == local["cpus"]
        assert hosts[name]["info"]["memory_bytes"] == local["memory_bytes"]
        assert hosts[name]["info"]["python"] and hosts[name]["info"]["disk_free_bytes"] > 0
    assert hosts["alias-box"]["port"] == sshd["port"]  # resolved through the ssh config
    assert (sshd["dir"] / "known_hosts").read_text().strip()  # accept-new recorded the host key
    assert rec["metrics"]["plan"]["nnodes"] == 3


def test_unreachable_host_reported_quickly_and_others_still_appear(sshd):
    closed = free_port()
    t0 = time.perf_counter()
    rec = discover(sshd, "--timeout", "3", f"127.0.0.1:{closed}", f"{sshd['user']}@127.0.0.1:{sshd['port']}").record
    hosts = {h["spec"]: h for h in rec["metrics"]["hosts"]}
    bad = hosts[f"127.0.0.1:{closed}"]
    assert bad["status"] == "unreachable" and "refused" in bad["error"].lower()
    assert bad["seconds"] < 3 + 2
    assert hosts[f"{sshd['user']}@127.0.0.1:{sshd['port']}"]["status"] == "reachable"
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("spec", ["-oProxyCommand=touch pwned", "gpu-box;id", "$(id)", "host\nname", "a b",
                                  "`id`", "host:99999", "user@host:0", "[fe80::1", "'quoted'"])
def test_injection_attempts_are_refused_and_nothing_runs(sshd, spec, tmp_path):
    res = run_itera("discover-cluster", "--ssh-config", sshd["config"], "--", spec)
    line = assert_usage_error(res, "refusing host spec")
    assert not sshd["marker"].exists() and not (REPO / "pwned").exists()
    assert "\n" not in line


def test_host_outside_the_allowlist_is_never_contacted(sshd):
    rec = discover(sshd, "8.8.8.8", "public-box", "localhost").record
    hosts = {h["spec"]: h for h in rec["metrics"]["hosts"]}
    assert hosts["8.8.8.8"]["status"] == "refused" and "outside the allowed networks" in hosts["8.8.8.8"]["error"]
    assert hosts["public-box"]["status"] == "refused"
    assert hosts["localhost"]["status"] == "reachable"
    assert not sshd["marker"].exists()  # the ProxyCommand for those hosts never ran: no connection attempted


def test_host_spec_parsing():
    s = parse_host_spec("user@host")
    assert (s.user, s.host, s.port) == ("user", "host", None)  # no port: ssh and its config choose
    s = parse_host_spec("alice@gpu-box:2222")
    assert (s.user, s.host, s.port) == ("alice", "gpu-box", 2222)
    s = parse_host_spec("[fe80::1]:22")
    assert (s.host, s.port) == ("fe80::1", 22)
    assert parse_host_spec("10.0.0.5").host == "10.0.0.5" and parse_host_spec("localhost").is_local
    policy = Policy.load()
    assert policy.check("10.0.0.5", ["10.0.0.5"]) is None
    assert "outside" in policy.check("8.8.8.8", ["8.8.8.8"])


def _fake(spec, address, gpus, cpus=8):
    return HostResult(spec, "reachable", address=address, port=22,
                      info={"cpus": cpus, "gpus": [{"name": "H100", "memory_bytes": 80 << 30}] * gpus})


def test_plan_for_injected_hosts():
    hosts = [_fake("a", "10.0.0.1", 4), _fake("b", "10.0.0.2", 2), HostResult("c", "unreachable", error="x"),
             _fake("d", "10.0.0.4", 8)]
    plan = launch_plan(hosts, "distill --teacher t --student half --data d.txt --out o", port=29400)
    assert plan["nnodes"] == 3 and plan["nproc_per_node"] == 2 and plan["world_size"] == 6
    assert plan["backend"] == "nccl" and plan["rdzv_endpoint"] == "10.0.0.1:29400"
    for rank, node in enumerate(plan["nodes"]):
        argv = shlex.split(node["command"])
        assert argv[:6] == ["torchrun", "--nnodes=3", "--nproc-per-node=2", f"--node-rank={rank}",
                            "--rdzv-backend=c10d", "--rdzv-endpoint=10.0.0.1:29400"]
        assert argv[6:] == ["--rdzv-id=itera", "-m", "itera", "distill", "--teacher", "t", "--student", "half",
                            "--data", "d.txt", "--out", "o"]
    assert plan["hostfile"] == "10.0.0.1 slots=2\n10.0.0.2 slots=2\n10.0.0.4 slots=2\n"
    cpu = launch_plan([_fake("x", "192.168.1.5", 0), _fake("y", "192.168.1.6", 2)], "distill")
    assert cpu["backend"] == "gloo" and cpu["nproc_per_node"] == 1


def test_generated_plan_launches_two_processes_on_localhost(teacher, distill_corpus, tmp_path):
    out = tmp_path / "student"
    launch = (f"distill --teacher {teacher} --student half --data {distill_corpus} --out {out} --steps 2 "
              "--batch-size 4 --seq-len 32")
    rec = run_itera("discover-cluster", "localhost", "--nproc-per-node", "2", "--launch", launch,
                    "--rdzv-port", str(free_port()), "--out", tmp_path / "inventory.json",
                    "--hostfile", tmp_path / "hostfile").record
    assert json.loads((tmp_path / "inventory.json").read_text())["plan"] == rec["metrics"]["plan"]
    assert (tmp_path / "hostfile").read_text() == "127.0.0.1 slots=2\n"
    argv = shlex.split(rec["metrics"]["plan"]["nodes"][0]["command"])
    assert argv[0] == "torchrun"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv[1:]], capture_output=True, text=True,
                       cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    records = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(records) == 1 and records[0]["params"]["processes"] == 2 and (out / "model.safetensors").is_file()


def test_bad_input(tmp_path):
    assert_usage_error(run_itera("discover-cluster"), "no hosts")
    assert_usage_error(run_itera("discover-cluster", "localhost", "--config", tmp_path / "none.yaml"),
                       "cluster policy")
    assert_usage_error(run_itera("discover-cluster", "localhost", "--timeout", "0"), "--timeout and --deadline")
