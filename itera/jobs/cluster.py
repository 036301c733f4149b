"""Inventory of the machines a user can reach over SSH, and a torchrun launch plan for them.

Security model: host specs are parsed strictly (no option injection, no shell metacharacters);
a host is probed only if the allowlist (``itera.configs/cluster.yaml`` by default) admits every address it
resolves to; remote probes go through the user's own ``ssh`` client with ``BatchMode=yes`` (no
password prompts), ``StrictHostKeyChecking=accept-new``, ``--`` before the destination, and a
fixed remote command (``python3 -``) that reads the probe program from stdin. itera discovers no
credentials: it uses the user's ssh agent, keys and ssh config, nothing else.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import shlex
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from itera.errors import InputError, UsageError
from itera.options import argument, flag, internal
from itera.progress import SILENT, Reporter
from itera.record import Outcome
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")
_FORBIDDEN = set(" \t\r\n'\"`;$|&<>()\\*?!{}#~,=")


@dataclass(frozen=True)
class HostSpec:
    raw: str
    host: str
    user: str | None = None
    port: int | None = None

    @property
    def is_local(self) -> bool:
        return self.user is None and self.port is None and self.host in ("localhost",)


def parse_host_spec(spec: str) -> HostSpec:
    """``host``, ``user@host``, ``host:port``, ``user@host:port``, ``[v6]``, ``[v6]:port``; strict."""
    def refuse(why: str) -> UsageError:
        shown = repr(spec) if len(spec) <= 80 else repr(spec[:60]) + f"… ({len(spec)} characters)"
        return UsageError(f"refusing host spec {shown}: {why}")

    if not isinstance(spec, str) or not spec:
        raise refuse("it is empty")
    if spec.startswith("-"):
        raise refuse("it starts with '-' (it would be read as an ssh option)")
    bad = sorted(set(spec) & _FORBIDDEN)
    if bad:
        raise refuse(f"it contains {''.join(bad)!r}; use host, user@host, host:port or [ipv6]")
    user, _, rest = spec.rpartition("@") if "@" in spec else (None, "", spec)
    if user is not None and (not user or user.startswith("-") or not set(user) <= _NAME_CHARS):
        raise refuse("the user name is not letters, digits, '.', '_' or '-'")
    port = None
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise refuse("an IPv6 address is missing its closing ']'")
        host, tail = rest[1:end], rest[end + 1:]
        try:
            ipaddress.IPv6Address(host.split("%")[0])
        except ValueError:
            raise refuse(f"{host!r} is not an IPv6 address") from None
        if tail:
            if not tail.startswith(":"):
                raise refuse("unexpected text after ']'")
            port = _port(tail[1:], refuse)
    else:
        if rest.count(":") > 1:
            raise refuse("write IPv6 addresses in brackets, e.g. [fe80::1]:22")
        host, sep, p = rest.partition(":")
        if sep:
            port = _port(p, refuse)
        if not host or not set(host) <= _NAME_CHARS or host.startswith(("-", ".")):
            raise refuse("the host name is not letters, digits, '.', '_' or '-'")
        # DNS: at most 63 characters a label, 253 a name (a longer one cannot even be looked up)
        if len(host.rstrip(".")) > 253 or any(len(label) > 63 for label in host.rstrip(".").split(".")):
            raise refuse("a host name has at most 253 characters and 63 between dots")
    return HostSpec(spec, host, user or None, port)


def _port(text: str, refuse) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise refuse(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


# --------------------------------------------------------------------------- policy


@dataclass
class Policy:
    """Which machines may be probed: every address a host (and every proxy hop on the way to
    it) resolves to must lie in ``networks``, and its name must match ``names``. ssh configs
    that run commands while being read (``ProxyCommand``, ``Match exec``) are refused unless
    the policy says otherwise."""

    networks: list
    names: list[str]
    allow_proxy_command: bool = False
    allow_match_exec: bool = False

    @classmethod
    def load(cls, path: Path | None = None) -> "Policy":
        from itera.paths import config_file

        if path:
            from itera.fsio import check_input_file

            path = Path(path)
            check_input_file(path, "cluster policy", "pass --config FILE (a YAML file)", UsageError)
        else:
            path = config_file("cluster.yaml")
            if not path.is_file():
                raise UsageError(f"cluster policy {path} does not exist; pass --config FILE")
        try:
            d = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UsageError(f"cluster policy {path} is not valid YAML: {' '.join(str(e).split())[:160]}") from None
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise UsageError(f"cluster policy {path} must be a mapping with networks and names, "
                             f"not a {type(d).__name__}")
        unknown = sorted(set(d) - {"networks", "names", "allow_proxy_command", "allow_match_exec"})
        if unknown:
            raise UsageError(f"cluster policy {path} has unknown field {unknown[0]!r}; fields: networks, names, "
                             "allow_proxy_command, allow_match_exec")
        nets, names = _string_list(d, "networks", path), _string_list(d, "names", path)
        try:
            networks = [ipaddress.ip_network(n, strict=False) for n in nets]
        except ValueError as e:
            raise UsageError(f"cluster policy {path}: field networks holds {e}") from None
        flags = {}
        for key in ("allow_proxy_command", "allow_match_exec"):
            v = d.get(key, False)
            if not isinstance(v, bool):
                raise UsageError(f"cluster policy {path}: field {key} must be true or false, got {v!r}")
            flags[key] = v
        return cls(networks, names, **flags)

    def check(self, name: str, addresses: list[str]) -> str | None:
        """None if allowed, else the reason it is refused."""
        is_literal = _is_ip(name)
        if not is_literal and not any(fnmatch.fnmatchcase(name, pat) for pat in self.names):
            return f"name {name!r} matches no allowed name pattern"
        if not addresses:
            return f"{name!r} does not resolve"
        for a in addresses:
            ip = ipaddress.ip_address(a.split("%")[0])
            if not any(ip in net for net in self.networks):
                return f"address {a} of {name!r} is outside the allowed networks"
        return None


def _string_list(d: dict, key: str, path: Path) -> list[str]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UsageError(f"cluster policy {path}: field {key} must be a list of strings, got {v!r}")
    return v


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text.split("%")[0])
        return True
    except ValueError:
        return False


def ssh_argv(spec: HostSpec, ssh_config: Path | None, *options: str) -> list[str]:
    """``ssh [options] [-F cfg] [-p port] [-l user] -- host``: the destination always after ``--``."""
    cmd = ["ssh", *options]
    if ssh_config:
        cmd += ["-F", str(ssh_config)]
    if spec.port:
        cmd += ["-p", str(spec.port)]
    if spec.user:
        cmd += ["-l", spec.user]
    return cmd + ["--", spec.host]


def ssh_effective(spec: HostSpec, ssh_config: Path | None) -> dict:
    """The destination after the user's ssh config (aliases, HostName, Port, User, ProxyJump,
    ProxyCommand): `ssh -G`, which makes no connection. Run only once :func:`match_exec_lines`
    found no ``Match exec`` (which ssh would run while evaluating the config)."""
    out = subprocess.run(ssh_argv(spec, ssh_config, "-G"), capture_output=True, text=True, timeout=10)
    conf = {}
    for line in out.stdout.splitlines():
        k, _, v = line.partition(" ")
        conf.setdefault(k.lower(), v)
    proxy_cmd = conf.get("proxycommand")
    jump = conf.get("proxyjump")
    return {"hostname": conf.get("hostname", spec.host), "port": int(conf.get("port", spec.port or 22)),
            "user": conf.get("user", spec.user),
            "proxycommand": None if proxy_cmd in (None, "none") else proxy_cmd,
            "proxyjump": [] if jump in (None, "none") else [h for h in jump.split(",") if h]}


def _ssh_config_files(ssh_config: Path | None) -> list[Path]:
    """The files ssh reads: -F's file alone, else ~/.ssh/config and /etc/ssh/ssh_config."""
    if ssh_config is not None:
        return [Path(ssh_config)]
    return [Path.home() / ".ssh" / "config", Path("/etc/ssh/ssh_config")]


def _check_ssh_config_file(f: Path, where: str) -> bool:
    """Whether ``f`` is a file to scan: a missing or unreadable one is skipped, as ssh skips it;
    a FIFO, device or socket is refused (reading it would block or never end)."""
    import stat as _stat

    from itera.fsio import check_input_file

    try:
        st = os.stat(f)
    except OSError:
        return False
    if _stat.S_ISDIR(st.st_mode):
        return False
    check_input_file(f, "ssh configuration file", "ssh reads only regular files; point it at one", UsageError,
                     where)
    return True


def match_exec_lines(ssh_config: Path | None, _depth: int = 0, _where: str = "") -> list[str]:
    """``file:line`` of every ``Match ... exec`` in the ssh configuration (Include followed):
    ssh runs that command whenever it reads the configuration, even for ``ssh -G``.

    A --ssh-config that is not a regular file, and any file it includes that is a FIFO, device
    or socket, is refused (UsageError): reading it would block forever."""
    import glob as _glob

    from itera.fsio import check_input_file

    found = []
    if _depth == 0 and ssh_config is not None:
        check_input_file(Path(ssh_config), "--ssh-config", "pass an ssh configuration file", UsageError)
    for f in _ssh_config_files(ssh_config) if _depth == 0 else [Path(ssh_config)]:
        if not _check_ssh_config_file(f, _where):
            continue
        try:
            lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        for n, line in enumerate(lines, 1):
            words = line.split("#", 1)[0].replace("=", " ").split()
            if not words:
                continue
            key = words[0].lower()
            if key == "match" and any(w.lower().lstrip("!") == "exec" for w in words[1:]):
                found.append(f"{f}:{n}")
            elif key == "include" and _depth < 8:
                base = Path.home() / ".ssh" if f.parent == Path.home() / ".ssh" else f.parent
                for pattern in words[1:]:
                    for inc in sorted(_glob.glob(str(Path(pattern).expanduser() if pattern.startswith("~")
                                                     else base / pattern))):
                        found += match_exec_lines(Path(inc), _depth + 1, f"included at {f}:{n}")
    return found


def resolve(name: str) -> list[str]:
    try:
        return sorted({ai[4][0] for ai in socket.getaddrinfo(name, None)})
    except socket.gaierror:
        return []


def check_route(spec: HostSpec, eff: dict, policy: Policy, ssh_config: Path | None, depth: int = 0) -> str | None:
    """None if the policy admits the host and every hop on the way to it, else the reason."""
    addrs = resolve(eff["hostname"])
    why = policy.check(eff["hostname"] if not _is_ip(spec.host) else spec.host, addrs)
    if why is None and eff["hostname"] != spec.host and not _is_ip(spec.host):
        why = policy.check(spec.host, addrs)  # the alias must be allowed too
    if why is not None:
        return why
    if eff["proxycommand"] and not policy.allow_proxy_command:
        return (f"{spec.raw!r} is reached through ProxyCommand {eff['proxycommand']!r}, which the policy does not "
                "allow (allow_proxy_command: true admits it)")
    for hop in eff["proxyjump"]:
        if depth >= 8:
            return f"{spec.raw!r} is reached through more than 8 ProxyJump hops"
        try:
            hop_spec = parse_host_spec(hop.removeprefix("ssh://"))
        except UsageError:
            return f"ProxyJump hop {hop!r} of {spec.raw!r} is not a host spec itera accepts"
        why = check_route(hop_spec, ssh_effective(hop_spec, ssh_config), policy, ssh_config, depth + 1)
        if why is not None:
            return f"ProxyJump hop {hop!r} of {spec.raw!r}: {why}"
    return None


# --------------------------------------------------------------------------- probing

PROBE = r'''
import json, os, platform, shutil, subprocess, socket
def meminfo():
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
def gpus():
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        out = subprocess.run([exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except Exception:
        return []
    rows = [r.split(",") for r in out.strip().splitlines() if r.strip()]
    return [{"name": r[0].strip(), "memory_bytes": int(float(r[1])) * 1024 * 1024} for r in rows if len(r) == 2]
def torch_version():
    try:
        from importlib import metadata
        return metadata.version("torch")
    except Exception:
        return None
print(json.dumps({"hostname": socket.gethostname(), "os": platform.platform(), "cpu_model": cpu_model(),
                  "cpus": os.cpu_count(), "memory_bytes": meminfo(), "gpus": gpus(),
                  "python": platform.python_version(), "torch": torch_version(),
                  "disk_free_bytes": shutil.disk_usage(os.path.expanduser("~")).free}))
'''


def probe_local() -> dict:
    """The probe program run in a fresh local interpreter (the same code as remote probes)."""
    import sys

    out = subprocess.run([sys.executable, "-"], input=PROBE, capture_output=True, text=True, timeout=30)
    return json.loads(out.stdout)


def probe_ssh(spec: HostSpec, timeout: float, ssh_config: Path | None) -> dict:
    cmd = ssh_argv(spec, ssh_config, "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(timeout)}",
                   "-o", "StrictHostKeyChecking=accept-new")
    cmd.append("python3 -")  # a fixed remote command: the probe program arrives on stdin
    p = subprocess.run(cmd, input=PROBE, capture_output=True, text=True, timeout=timeout + 20)
    if p.returncode != 0:
        err = (p.stderr.strip().splitlines() or [f"ssh exited with {p.returncode}"])[-1]
        raise ConnectionError(err)
    return json.loads(p.stdout.strip().splitlines()[-1])


@dataclass
class HostResult:
    spec: str
    status: str  # reachable | unreachable | refused
    address: str | None = None
    port: int | None = None
    user: str | None = None
    info: dict | None = None
    error: str | None = None
    seconds: float | None = None


def discover(specs: list[HostSpec], policy: Policy, timeout: float = 5.0, deadline: float = 60.0,
             ssh_config: Path | None = None) -> list[HostResult]:
    """Check every host against the policy, then probe the admitted ones in parallel."""
    results: list[HostResult | None] = [None] * len(specs)
    jobs = []
    exec_lines = None if policy.allow_match_exec else match_exec_lines(ssh_config)
    for i, spec in enumerate(specs):
        if spec.is_local:
            jobs.append((i, spec, "local", None))
            continue
        if exec_lines:
            results[i] = HostResult(spec.raw, "refused", error=(
                f"the ssh configuration has `Match exec` ({exec_lines[0]}), which runs a command whenever ssh reads "
                "it; itera does not read it unless the policy sets allow_match_exec: true"))
            continue
        eff = ssh_effective(spec, ssh_config)
        why = check_route(spec, eff, policy, ssh_config)
        if why:
            results[i] = HostResult(spec.raw, "refused", error=why)
        else:
            jobs.append((i, spec, "ssh", eff))

    def run(job):
        i, spec, kind, eff = job
        t0 = time.perf_counter()
        try:
            info = probe_local() if kind == "local" else probe_ssh(spec, timeout, ssh_config)
            res = HostResult(spec.raw, "reachable", info=info)
        except (ConnectionError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as e:
            res = HostResult(spec.raw, "unreachable", error=str(e) or type(e).__name__)
        res.seconds = time.perf_counter() - t0
        if eff:
            res.address, res.port, res.user = eff["hostname"], eff["port"], eff["user"]
        else:
            res.address = "127.0.0.1"
        return i, res

    with ThreadPoolExecutor(max_workers=max(1, min(16, len(jobs)))) as pool:
        futures = [pool.submit(run, j) for j in jobs]
        end = time.monotonic() + deadline
        for f in futures:
            try:
                i, res = f.result(timeout=max(0.0, end - time.monotonic()))
                results[i] = res
            except TimeoutError:
                pass
    for i, r in enumerate(results):
        if r is None:
            results[i] = HostResult(specs[i].raw, "unreachable", error=f"no answer within the {deadline:.0f} s deadline")
    return results  # type: ignore[return-value]


# --------------------------------------------------------------------------- plan


def launch_plan(hosts: list[HostResult], launch: str, nproc_per_node: int | None = None, port: int = 29500,
                run_id: str = "itera") -> dict:
    """torchrun lines for every reachable host: node ranks in the given order, rendezvous on the first."""
    up = [h for h in hosts if h.status == "reachable"]
    if not up:
        return {"nnodes": 0, "error": "no reachable host"}
    gpus = [len(h.info.get("gpus") or []) for h in up]
    if nproc_per_node is None:
        nproc_per_node = min(gpus) if all(gpus) else 1
    backend = "nccl" if all(gpus) else "gloo"
    master = up[0].address or "127.0.0.1"
    endpoint = f"[{master}]:{port}" if ":" in master else f"{master}:{port}"
    argv = shlex.split(launch)
    lines = []
    for rank, h in enumerate(up):
        cmd = ["torchrun", f"--nnodes={len(up)}", f"--nproc-per-node={nproc_per_node}", f"--node-rank={rank}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", "-m", "itera", *argv]
        lines.append({"host": h.spec, "node_rank": rank, "command": shlex.join(cmd)})
    return {"nnodes": len(up), "nproc_per_node": nproc_per_node, "world_size": len(up) * nproc_per_node,
            "backend": backend, "rdzv_endpoint": endpoint, "nodes": lines,
            "hostfile": "".join(f"{h.address} slots={nproc_per_node}\n" for h in up)}


def as_dicts(results: list[HostResult]) -> list[dict]:
    return [asdict(r) for r in results]


# --------------------------------------------------------------------------- the job


@dataclass
class DiscoverOptions:
    hosts: list[str] = argument("hosts", default_factory=list)
    hosts_file: Path | None = flag("--hosts-file", default=None)
    config: Path | None = flag("--config", default=None)
    ssh_config: Path | None = flag("--ssh-config", default=None)
    timeout: float = flag("--timeout", default=5.0)
    deadline: float = flag("--deadline", default=60.0)
    launch: str = flag("--launch", default="distill --help")
    nproc_per_node: int | None = flag("--nproc-per-node", default=None)
    rdzv_port: int = flag("--rdzv-port", default=29500)
    out: Path | None = flag("--out", default=None)
    hostfile: Path | None = flag("--hostfile", default=None)
    force: bool = flag("--force", default=False)
    # the itera commands --launch may start with
    commands: tuple[str, ...] = internal("the CLI fills it in from its own command list", default=())

    def inputs(self) -> list[Path]:
        return [p for p in (self.hosts_file, self.config, self.ssh_config) if p is not None]

    def outputs(self) -> list:
        from itera.fsio import Output

        return [Output(p, "file", opt, self.force) for p, opt in ((self.out, "--out"), (self.hostfile, "--hostfile"))
                if p is not None]

    def validate(self) -> "DiscoverOptions":
        import math

        for name, v in (("timeout", self.timeout), ("deadline", self.deadline)):
            if not (math.isfinite(v) and 0 < v <= 3600):
                raise UsageError(f"--timeout and --deadline must be positive numbers of seconds (at most 3600); "
                                 f"--{name} is {v}")
        if self.nproc_per_node is not None and not 1 <= self.nproc_per_node <= 1024:
            raise UsageError(f"--nproc-per-node must be from 1 to 1024 (got {self.nproc_per_node})")
        if not 1 <= self.rdzv_port <= 65535:
            raise UsageError(f"--rdzv-port must be a TCP port from 1 to 65535 (got {self.rdzv_port})")
        if self.ssh_config is not None:  # ssh -F reads it: a FIFO would block ssh (and itera) forever
            from itera.fsio import check_input_file

            check_input_file(Path(self.ssh_config), "--ssh-config", "pass an ssh configuration file", UsageError)
        try:
            words = shlex.split(self.launch)
        except ValueError as e:
            raise UsageError(f"--launch {self.launch!r} is not a command line ({e})") from None
        if self.commands and (not words or words[0] not in self.commands):
            raise UsageError(f"--launch {self.launch!r} does not start with an itera command (the plan runs "
                             f"`torchrun ... -m itera <launch>`); use one of: {', '.join(self.commands)}")
        return self

    def host_specs(self) -> list[str]:
        """The hosts as typed, then those of --hosts-file (one per line, '#' comments)."""
        specs = list(self.hosts)
        if self.hosts_file is not None:
            from itera.fsio import check_input_file

            check_input_file(Path(self.hosts_file), "--hosts-file", "pass a text file with one host per line",
                             UsageError)
            try:
                text = Path(self.hosts_file).read_text(encoding="utf-8")
            except (UnicodeDecodeError, IsADirectoryError):
                raise UsageError(f"--hosts-file {self.hosts_file} is not UTF-8 text with one host per line") from None
            specs += [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if not specs:
            raise UsageError("no hosts: pass host specs (e.g. localhost user@gpu-box:2222) or --hosts-file FILE")
        return specs

    def as_params(self, specs: list[str]) -> dict:
        return {"hosts": specs, "config": str(self.config) if self.config else None,
                "ssh_config": str(self.ssh_config) if self.ssh_config else None, "timeout": self.timeout,
                "deadline": self.deadline, "launch": self.launch, "nproc_per_node": self.nproc_per_node,
                "rdzv_port": self.rdzv_port}


def run_discover(opts: DiscoverOptions, reporter: Reporter = SILENT) -> Outcome:
    """Check every spec, probe the allowed hosts, plan the launch, write the inventory files."""
    from itera.fsio import write_text_atomic
    from itera.artifacts import describe_artifact

    opts.validate()
    texts = opts.host_specs()
    specs = [parse_host_spec(s) for s in texts]  # every spec is checked before anything runs
    policy = Policy.load(opts.config)
    results = discover(specs, policy, timeout=opts.timeout, deadline=opts.deadline, ssh_config=opts.ssh_config)
    if not any(r.status == "reachable" for r in results):
        why = "; ".join(f"{r.spec}: {r.status} ({r.error})" for r in results)
        raise InputError(f"no host is reachable, so there is nothing to plan: {why}")
    plan = launch_plan(results, opts.launch, opts.nproc_per_node, opts.rdzv_port)
    inventory = {"hosts": as_dicts(results), "plan": plan}
    artifact = None
    if opts.out is not None:
        write_text_atomic(opts.out, json.dumps(inventory, indent=2) + "\n")
        artifact = describe_artifact(opts.out, "inventory", "json")
    if opts.hostfile is not None and plan.get("hostfile"):
        write_text_atomic(opts.hostfile, plan["hostfile"])
    up = [r for r in results if r.status == "reachable"]
    metrics = {
        "hosts_reachable": len(up), "hosts_unreachable": sum(r.status == "unreachable" for r in results),
        "hosts_refused": sum(r.status == "refused" for r in results),
        "total_cpus": sum(r.info.get("cpus") or 0 for r in up),
        "total_gpus": sum(len(r.info.get("gpus") or []) for r in up),
        "total_memory_bytes": sum(r.info.get("memory_bytes") or 0 for r in up),
        **inventory,
    }
    return Outcome(artifact, metrics, opts.as_params(texts))
