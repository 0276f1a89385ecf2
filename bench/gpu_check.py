"""Check the NVML backend against a real GPU: does it see what a CUDA job does?

For a machine with an NVIDIA GPU, torch with CUDA and nvidia-ml-py (no Ray or
MLflow needed). It reads every device with :class:`NvmlBackend`, then starts a
child process with ``CUDA_VISIBLE_DEVICES=k`` (``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
so CUDA's ordering is NVML's) that checks it sees exactly one GPU, allocates
``--alloc-gib`` on ``cuda:0`` and trains ``jobs.zoo``'s "mlp" for a few
steps, then holds its memory while the parent reads again and checks that
GPU k's used memory rose by at least the allocation and lists the child's pid.

Usage::

    python bench/gpu_check.py [--gpu K] [--alloc-gib 2] [--steps 20]

Prints PASS/FAIL lines and ends with
``RESULT gpu_check gpus=N visible_only_k=true|false memory_seen=true|false``
(``memory_seen``: the rise and the pid were both seen). Exit status: 0 all
passed, 1 a check failed, 2 NVML unavailable or no GPU.

In a container without the host's pid namespace NVML reports host pids, so
the pid check can fail while memory accounting is right; the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from workers.interface.errors import NvmlUnavailable
from workers.interface.telemetry import GIB, GpuReading
from workers.nvml_backend import NvmlBackend


def child_main(alloc_bytes: int, steps: int) -> int:
    """In the child: use the one visible GPU, report, and hold the memory until told to stop."""
    import torch
    import torch.nn.functional as F

    from jobs.zoo import build_model, example_input

    info: dict[str, Any] = {"pid": os.getpid(), "device_count": torch.cuda.device_count()}
    if info["device_count"] < 1:
        print("READY " + json.dumps(info), flush=True)
        return 1
    device = torch.device("cuda:0")
    props = torch.cuda.get_device_properties(0)
    info["uuid"] = str(getattr(props, "uuid", "")) or None
    info["name"] = props.name
    held = torch.empty(alloc_bytes, dtype=torch.uint8, device=device)
    held.fill_(1)  # touch it, so the allocation is real and not just reserved address space
    model = build_model("mlp", {}).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    inputs = example_input("mlp", {}, batch=64).to(device)
    targets = torch.randint(0, 10, (64,), device=device)
    for _ in range(steps):
        loss = F.cross_entropy(model(inputs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    info.update(loss=loss.item(), allocated_bytes=torch.cuda.memory_allocated())
    print("READY " + json.dumps(info), flush=True)
    sys.stdin.readline()  # the parent reads NVML while we hold the memory
    del held
    return 0


def describe(gpu: GpuReading) -> str:
    """One line per device, nvidia-smi style."""
    if not gpu.available:
        return f"  [{gpu.index}] {gpu.uuid} UNAVAILABLE"
    used = (gpu.memory_used_bytes or 0) / GIB
    total = (gpu.memory_total_bytes or 0) / GIB
    procs = ", ".join(f"{p.pid}:{(p.used_memory_bytes or 0) / GIB:.2f}GiB" for p in gpu.processes)
    return (
        f"  [{gpu.index}] {gpu.uuid} {gpu.name} mem {used:.2f}/{total:.2f} GiB "
        f"util {gpu.util_pct}% temp {gpu.temperature_c}C power {gpu.power_w}W "
        f"mig {gpu.mig_mode} nvlink {len(gpu.nvlink_peers)} procs [{procs}]"
    )


def check(name: str, ok: bool, detail: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return ok


def _same_uuid(cuda_uuid: str | None, nvml_uuid: str) -> bool | None:
    """torch prints UUIDs without NVML's ``GPU-`` prefix; ``None`` if torch gave none."""
    if not cuda_uuid:
        return None
    return cuda_uuid.lower().removeprefix("gpu-") == nvml_uuid.lower().removeprefix("gpu-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--gpu", type=int, default=None, help="NVML index to test (default: last)")
    parser.add_argument("--alloc-gib", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    alloc_bytes = int(args.alloc_gib * GIB)
    if args.child:
        return child_main(alloc_bytes, args.steps)

    backend = NvmlBackend()
    try:
        before = backend.read()
    except NvmlUnavailable as exc:
        print(f"NVML unavailable, nothing to check: {exc}")
        print("RESULT gpu_check gpus=0 visible_only_k=false memory_seen=false")
        return 2
    print(f"NVML sees {len(before)} GPU(s):")
    for gpu in before:
        print(describe(gpu))
    if not before:
        print("RESULT gpu_check gpus=0 visible_only_k=false memory_seen=false")
        return 2
    k = len(before) - 1 if args.gpu is None else args.gpu
    if not 0 <= k < len(before):
        parser.error(f"--gpu {k}: NVML sees indices 0..{len(before) - 1}")

    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(k), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    command = [sys.executable, str(Path(__file__).resolve()), "--child"]
    command += ["--alloc-gib", str(args.alloc_gib), "--steps", str(args.steps)]
    print(f"child: CUDA_VISIBLE_DEVICES={k} allocating {args.alloc_gib} GiB, {args.steps} steps")
    child = subprocess.Popen(
        command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    watchdog = threading.Timer(args.timeout_s, child.kill)
    watchdog.start()
    info: dict[str, Any] | None = None
    try:
        assert child.stdout is not None and child.stdin is not None
        for line in child.stdout:
            if line.startswith("READY "):
                info = json.loads(line.removeprefix("READY "))
                break
            print(f"child: {line.rstrip()}")
        during = backend.read() if info is not None else ()
        child.stdin.write("done\n")
        child.stdin.close()
    except BrokenPipeError:
        pass  # the child died; its status says how
    finally:
        child.wait()
        watchdog.cancel()
        backend.close()

    results = []
    if info is None or not during:
        check("child", False, f"no READY from the child (exit status {child.returncode})")
        print(f"RESULT gpu_check gpus={len(before)} visible_only_k=false memory_seen=false")
        return 1
    print(f"child reported: {json.dumps(info)}")
    print(f"NVML while the child holds its memory (GPU {k} under test):")
    for gpu in during:
        print(describe(gpu))

    same = _same_uuid(info.get("uuid"), before[k].uuid)
    elsewhere = [
        g.index for g in during if g.index != k and info["pid"] in {p.pid for p in g.processes}
    ]
    visible_ok = info["device_count"] == 1 and same is not False and not elsewhere
    results.append(
        check(
            "visible_only_k",
            visible_ok,
            f"child sees {info['device_count']} device(s); cuda:0 is NVML GPU {k}: "
            f"{'unknown (torch gave no uuid)' if same is None else same}; "
            f"child pid on other GPUs: {elsewhere or 'none'}",
        )
    )
    rise = (during[k].memory_used_bytes or 0) - (before[k].memory_used_bytes or 0)
    rose = check(
        "memory_rose",
        rise >= alloc_bytes,
        f"GPU {k} used memory rose by {rise / GIB:.2f} GiB (allocated {alloc_bytes / GIB:.2f} GiB)",
    )
    pids = [p.pid for p in during[k].processes]
    pid_seen = check(
        "pid_listed",
        info["pid"] in pids,
        f"child pid {info['pid']} in GPU {k} processes {pids}"
        + ("" if info["pid"] in pids or not pids else " (different pid namespace?)"),
    )
    results += [rose, pid_seen]
    results.append(check("child_exit", child.returncode == 0, f"status {child.returncode}"))
    memory_seen = rose and pid_seen
    print(
        f"RESULT gpu_check gpus={len(before)} visible_only_k={str(visible_ok).lower()} "
        f"memory_seen={str(memory_seen).lower()}"
    )
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
