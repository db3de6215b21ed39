#!/usr/bin/env python3
"""Start ``hgrn2-pretrain`` on one or many nodes: torchrun, SLURM, or the DeepSpeed launcher.

    launch/launch.py torchrun  --config C [--nodes N --node-rank R --nproc-per-node G --master-addr A --master-port P]
    launch/launch.py slurm     --config C [--nodes N --nproc-per-node G]           (inside an allocation: srun)
    launch/launch.py deepspeed --config C --hostfile H [--master-addr A --master-port P]
    ... [--dry-run] [--skip-preflight] [--cpu] [-- key=value ...]

Every mode first runs a preflight (``--skip-preflight`` skips it): the GPUs this node needs are visible,
the world size (nodes × processes per node) is a multiple of TP × PP and the layout can run this model
(``pretrain.parallel.layout``), the global batch divides by micro-batch × DP, and the master is reachable
(node rank > 0: a TCP connection to MASTER_ADDR:MASTER_PORT, retried for ``--wait`` seconds; rank 0:
the address is this machine's and the port is free). A failure prints what to change and exits 2.
``--dry-run`` prints the resolved commands (one per node) and exits. ``--cpu`` runs on CPUs over gloo
(tests; no GPU check). See docs/launch.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NCCL_DEFAULTS = {
    # Surface NCCL errors as exceptions instead of hangs; keep NVLink SHARP/multicast off (device README).
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


class PreflightError(RuntimeError):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="launch.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("torchrun", "slurm", "deepspeed"))
    parser.add_argument("--config", required=True, help="training config YAML (configs/NAME.yaml)")
    parser.add_argument("--nodes", type=int, default=None, help="number of nodes (default: 1, or SLURM_NNODES)")
    parser.add_argument("--node-rank", type=int, default=None, help="this node's rank (default: 0, or SLURM_NODEID)")
    parser.add_argument("--nproc-per-node", type=int, default=None, help="processes (GPUs) per node")
    parser.add_argument("--master-addr", default=None, help="address of node 0 (default: MASTER_ADDR or 127.0.0.1)")
    parser.add_argument("--master-port", type=int, default=None, help="port on node 0 (default: MASTER_PORT or 29500)")
    parser.add_argument("--hostfile", default=None, help="deepspeed: hostfile, lines 'host slots=N'")
    parser.add_argument("--no-ssh", action="store_true",
                        help="deepspeed: no ssh/pdsh; run this on every node with --node-rank (automatic for one "
                        "local host)")
    parser.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the master (node rank > 0)")
    parser.add_argument("--cpu", action="store_true", help="run on CPUs over gloo (no GPU check)")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved commands and exit")
    parser.add_argument("--skip-preflight", action="store_true")
    parser.add_argument("--entry", default="pretrain.train", help="Python module to run (default: the trainer)")
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    args = parser.parse_args(argv)
    args.overrides = overrides
    return args


# ---------------------------------------------------------------------------------------------------
# resolution


def slurm_nodes() -> list[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return []
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return [nodelist.split(",")[0]]


def read_hostfile(path: str) -> list[tuple[str, int]]:
    hosts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = [p for p in parts[1:] if p.startswith("slots=")]
        if not slots:
            raise PreflightError(f"{path}:{number}: expected 'HOST slots=N', got {line!r}")
        hosts.append((parts[0], int(slots[0].split("=", 1)[1])))
    if not hosts:
        raise PreflightError(f"{path}: no hosts")
    return hosts


def visible_gpus() -> int:
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if devices is not None and devices.strip() in ("", "-1"):
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        count = sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.TimeoutExpired):
        count = 0
    if devices is not None and count:
        count = min(count, len([d for d in devices.split(",") if d.strip()]))
    return count


def resolve(args: argparse.Namespace) -> dict:
    """Nodes, node rank, processes per node, master address and port, from flags, then SLURM/env."""
    r = {}
    if args.mode == "deepspeed":
        if not args.hostfile:
            raise PreflightError("deepspeed mode needs --hostfile FILE (lines 'host slots=N')")
        hosts = read_hostfile(args.hostfile)
        r["hosts"] = hosts
        r["nodes"] = len(hosts)
        slots = {s for _, s in hosts}
        if len(slots) != 1:
            raise PreflightError(f"{args.hostfile}: every host must have the same slots, got {sorted(slots)}")
        r["nproc"] = args.nproc_per_node or slots.pop()
        r["node_rank"] = 0
        r["master_addr"] = args.master_addr or hosts[0][0]
    else:
        slurm = args.mode == "slurm"
        r["nodes"] = args.nodes or int(os.environ.get("SLURM_NNODES", "1") if slurm else 1)
        r["node_rank"] = args.node_rank if args.node_rank is not None else int(
            os.environ.get("SLURM_NODEID", "0") if slurm else 0
        )
        default_nproc = int(os.environ.get("SLURM_GPUS_ON_NODE", "0") or 0) if slurm else 0
        r["nproc"] = args.nproc_per_node or default_nproc or (1 if args.cpu else max(visible_gpus(), 1))
        hosts = slurm_nodes() if slurm else []
        r["master_addr"] = args.master_addr or os.environ.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1")
    r["master_port"] = args.master_port or int(os.environ.get("MASTER_PORT", "29500"))
    r["world"] = r["nodes"] * r["nproc"]
    if not 0 <= r["node_rank"] < r["nodes"]:
        raise PreflightError(f"--node-rank {r['node_rank']} is outside 0..{r['nodes'] - 1} (--nodes {r['nodes']})")
    return r


# ---------------------------------------------------------------------------------------------------
# preflight


def check_layout(args: argparse.Namespace, world: int) -> str:
    sys.path.insert(0, str(ROOT))
    from pretrain.config import ConfigError, load_config
    from pretrain.parallel.layout import LayoutError, layout_from_config

    try:
        cfg = load_config(args.config, args.overrides)
        layout = layout_from_config(cfg, world, cfg.model_config())
    except (ConfigError, LayoutError) as error:
        raise PreflightError(str(error)) from None
    b = cfg.batch
    if b.global_batch_size % (b.micro_batch_size * layout.data):
        raise PreflightError(
            f"batch.global_batch_size ({b.global_batch_size}) must be a multiple of batch.micro_batch_size × DP "
            f"({b.micro_batch_size} × {layout.data}); change the batch sizes or the number of processes"
        )
    return layout.describe()


def is_local_address(address: str) -> bool:
    try:
        infos = socket.getaddrinfo(address, None)
    except socket.gaierror:
        return False
    addresses = {info[4][0] for info in infos}
    if any(a.startswith("127.") or a == "::1" for a in addresses):
        return True
    for candidate in addresses:
        try:
            with socket.socket(socket.AF_INET6 if ":" in candidate else socket.AF_INET) as probe:
                probe.bind((candidate, 0))
            return True
        except OSError:
            continue
    return False


def check_master(r: dict, wait: float) -> str:
    addr, port = r["master_addr"], r["master_port"]
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as error:
        raise PreflightError(f"master address {addr!r} does not resolve ({error}); set --master-addr to node 0's "
                             "hostname or IP") from None
    if r["node_rank"] == 0:
        if not is_local_address(addr):
            raise PreflightError(f"this is node rank 0 but the master address {addr!r} is not one of this machine's "
                                 "addresses; run node rank 0 on the master, or set --master-addr to this machine")
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("", port))
            except OSError:
                raise PreflightError(f"master port {port} is already in use on this machine; pick another "
                                     "--master-port (the same on every node)") from None
        return f"master {addr}:{port} is this machine, port free"
    deadline = time.time() + wait
    last = None
    while time.time() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=5):
                return f"master {addr}:{port} reachable"
        except OSError as error:
            last = error
            time.sleep(1.0)
    raise PreflightError(f"master {addr}:{port} not reachable after {wait:.0f}s ({last}): start node rank 0 first, "
                         "check --master-addr/--master-port and that the port is open between the nodes")


def check_gpus(r: dict, cpu: bool) -> str:
    if cpu:
        return "CPU run (gloo), no GPU check"
    count = visible_gpus()
    if count < r["nproc"]:
        raise PreflightError(f"{r['nproc']} processes per node need {r['nproc']} GPUs, but {count} are visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); lower "
                             "--nproc-per-node, or pass --cpu to run on CPUs over gloo")
    return f"{count} GPUs visible"


def preflight(args: argparse.Namespace, r: dict) -> list[str]:
    notes = [f"layout {check_layout(args, r['world'])} (world {r['world']} = {r['nodes']} nodes × {r['nproc']})"]
    if args.mode == "slurm" and args.dry_run:
        return notes  # the GPUs and the master are checked on each node when the job runs
    if args.mode == "deepspeed":
        for host, _ in r["hosts"]:
            try:
                socket.getaddrinfo(host, 22)
            except socket.gaierror:
                raise PreflightError(f"hostfile host {host!r} does not resolve") from None
        notes.append(f"{len(r['hosts'])} hosts resolve")
        if r["hosts"][0][0] in ("localhost", "127.0.0.1"):
            notes.append(check_gpus(r, args.cpu))
        return notes
    notes.append(check_gpus(r, args.cpu))
    notes.append(check_master(r, args.wait))
    return notes


# ---------------------------------------------------------------------------------------------------
# commands


def trainer_args(args: argparse.Namespace) -> list[str]:
    return ["-m", args.entry, "--config", args.config, *args.overrides]


def torchrun_command(args: argparse.Namespace, r: dict, node_rank: int) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(r["nodes"]), "--node-rank", str(node_rank), "--nproc-per-node", str(r["nproc"]),
        "--master-addr", r["master_addr"], "--master-port", str(r["master_port"]),
        *trainer_args(args),
    ]


def deepspeed_command(args: argparse.Namespace, r: dict) -> list[str]:
    local_only = len(r["hosts"]) == 1 and is_local_address(r["hosts"][0][0])
    no_ssh = ["--no_ssh", "--node_rank", str(args.node_rank or 0)] if args.no_ssh or local_only else []
    return [
        "deepspeed", "--hostfile", args.hostfile, "--num_nodes", str(r["nodes"]), "--num_gpus", str(r["nproc"]),
        "--master_addr", r["master_addr"], "--master_port", str(r["master_port"]), *no_ssh,
        "--no_local_rank", "--module", args.entry, "--config", args.config, *args.overrides,
    ]


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = {} if args.cpu else {k: os.environ.get(k, v) for k, v in NCCL_DEFAULTS.items()}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    if args.cpu:
        env["HGRN2_FORCE_CPU"] = "1"
        env["DS_ACCELERATOR"] = "cpu"
    return env


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        r = resolve(args)
        notes = [] if args.skip_preflight else preflight(args, r)
    except PreflightError as error:
        print(f"launch: preflight failed: {error}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"launch: preflight ok: {note}", file=sys.stderr)
    env = environment(args)
    env_text = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    if args.mode == "deepspeed":
        commands = [(None, deepspeed_command(args, r))]
    elif args.mode == "slurm" and (args.dry_run or "SLURM_NODEID" not in os.environ):
        commands = [(rank, torchrun_command(args, r, rank)) for rank in range(r["nodes"])]
    else:
        commands = [(r["node_rank"], torchrun_command(args, r, r["node_rank"]))]
    if args.dry_run:
        for rank, command in commands:
            where = "" if rank is None else f"# node rank {rank}\n"
            print(f"{where}cd {shlex.quote(str(ROOT))} && {env_text} {shlex.join(command)}")
        return 0
    if len(commands) != 1:
        print("launch: slurm mode runs inside an allocation (srun sets SLURM_NODEID); use launch/slurm.sbatch",
              file=sys.stderr)
        return 2
    command = commands[0][1]
    print(f"launch: {shlex.join(command)}", file=sys.stderr, flush=True)
    os.chdir(ROOT)
    os.execvpe(command[0], command, {**os.environ, **env})


if __name__ == "__main__":
    sys.exit(main())
