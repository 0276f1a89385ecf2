"""Check the NVML backend against a real GPU: does it see what a CUDA job does?

For a machine with an NVIDIA GPU, torch with CUDA and nvidia-ml-py (no Ray or
MLflow needed). It reads every device with :class:`NvmlBackend`, then starts a
child process with ``CUDA_VISIBLE_DEVICES=k`` (``CUDA_DEVICE_ORDER=PCI_BUS_ID``,
so CUDA's ordering is NVML's) that checks it sees exactly one GPU, allocates
``--alloc-gib`` on ``cuda:0`` and trains ``jobs.zoo``'s "mlp" for a few
steps, then holds its memory while the parent reads again and checks that
GPU k's used memory rose by at least the allocation and lists the child's pid.

Then the enforced GPU memory cap (``--cap-gib``), both halves:

- in the process: a child with torch's per-process memory fraction set from the
  cap (``workers.gpu_caps.limit_gpu_memory``) allocates below the cap (must
  succeed) and past it (must raise ``torch.cuda.OutOfMemoryError``), then holds
  what it got while the parent checks that NVML's reading of it stays within the
  cap plus the CUDA-context allowance, so the watchdog leaves it alone;
- in the node agent: a child registered with that cap allocates ``--hog-gib``
  (more) without a fraction, and :class:`workers.memory_caps.CapWatchdog` on real
  :class:`NvmlBackend` readings must stop it (SIGKILL to its process group) and
  write the reason ``used X GiB on GPU K, asked for Y GiB; raise ...``.

Usage::

    python bench/gpu_check.py [--gpu K] [--alloc-gib 2] [--steps 20] [--cap-gib 2] [--hog-gib 5]

Prints PASS/FAIL lines and ends with
``RESULT gpu_check gpus=N visible_only_k=true|false memory_seen=true|false
fraction_enforced=true|false watchdog_stopped=true|false``
(``memory_seen``: the rise and the pid were both seen). Exit status: 0 all
passed, 1 a check failed, 2 NVML unavailable or no GPU (it says so).

In a container without the host's pid namespace NVML reports host pids, so
the pid check can fail while memory accounting is right; the output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere

from workers.interface.errors import NvmlUnavailable
from workers.interface.telemetry import GIB, GpuReading
from workers.memory_caps import CONTEXT_ALLOWANCE_BYTES, CapWatchdog, read_verdict, register_cap
from workers.nvml_backend import NvmlBackend

_NO_GPU = (
    "RESULT gpu_check gpus=0 visible_only_k=false memory_seen=false "
    "fraction_enforced=false watchdog_stopped=false"
)


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


def fraction_child(cap_bytes: int) -> int:
    """In a child: cap torch at ``cap_bytes``, allocate below it, then past it; hold."""
    import torch

    from workers.gpu_caps import limit_gpu_memory

    info: dict[str, Any] = {"pid": os.getpid(), "fractions": limit_gpu_memory(cap_bytes)}
    device = torch.device("cuda:0")
    below = torch.empty(int(cap_bytes * 0.8), dtype=torch.uint8, device=device)
    below.fill_(1)
    info["below_ok"] = True
    try:
        torch.empty(int(cap_bytes * 0.4), dtype=torch.uint8, device=device).fill_(1)
        info["over_raised"] = False
    except torch.cuda.OutOfMemoryError as exc:
        info["over_raised"] = True
        info["oom"] = str(exc).splitlines()[0][:200]
    torch.cuda.synchronize()
    info["reserved_bytes"] = torch.cuda.memory_reserved()
    print("READY " + json.dumps(info), flush=True)
    sys.stdin.readline()
    return 0


def hog_child(alloc_bytes: int) -> int:
    """In a child: allocate ``alloc_bytes`` with no cap in torch, and hold it until killed."""
    import torch

    held = torch.empty(alloc_bytes, dtype=torch.uint8, device=torch.device("cuda:0"))
    held.fill_(1)
    torch.cuda.synchronize()
    print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
    sys.stdin.readline()
    return 0


def _start_child(k: int, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any] | None]:
    """A child of this script on GPU ``k`` (its own process group), and its READY info."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(k), CUDA_DEVICE_ORDER="PCI_BUS_ID")
    child = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), *args],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert child.stdout is not None
    for line in child.stdout:
        if line.startswith("READY "):
            return child, json.loads(line.removeprefix("READY "))
        print(f"child: {line.rstrip()}")
    return child, None


def _end_child(child: subprocess.Popen[str]) -> None:
    try:
        assert child.stdin is not None
        child.stdin.write("done\n")
        child.stdin.close()
    except (BrokenPipeError, OSError):
        pass  # it is gone already
    try:
        child.wait(timeout=30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()


def _used_by(gpu: GpuReading, pid: int) -> int | None:
    return next((p.used_memory_bytes for p in gpu.processes if p.pid == pid), None)


def check_caps(
    backend: NvmlBackend, k: int, cap_bytes: int, hog_bytes: int, timeout_s: float
) -> tuple[bool, bool]:
    """The in-process fraction and the watchdog on GPU ``k``: (fraction_enforced, stopped)."""
    cap_gib, hog_gib = cap_bytes / GIB, hog_bytes / GIB
    print(
        f"cap: {cap_gib:g} GiB on GPU {k} (CUDA-context allowance "
        f"{CONTEXT_ALLOWANCE_BYTES / GIB:g} GiB)"
    )
    child, info = _start_child(k, "--fraction-child", "--cap-gib", str(cap_gib))
    with tempfile.TemporaryDirectory(prefix="jw-caps-") as tmp:
        registry = Path(tmp) / "caps"
        registry.mkdir()
        try:
            if info is None:
                check("fraction_child", False, f"no READY (exit status {child.wait()})")
                return False, False
            print(f"fraction child reported: {json.dumps(info)}")
            fraction_ok = check(
                "fraction_enforced",
                bool(info["below_ok"] and info["over_raised"]),
                f"fraction {info['fractions']}: {0.8 * cap_gib:.2f} GiB allocated; "
                f"{1.2 * cap_gib:.2f} GiB in all "
                + ("raised OutOfMemoryError" if info["over_raised"] else "did NOT raise"),
            )
            register_cap(
                registry, "job", "capped", info["pid"], [k], cap_bytes, Path(tmp) / "capped.json"
            )
            used = _used_by(backend.read()[k], info["pid"])
            within = used is not None and used <= cap_bytes + CONTEXT_ALLOWANCE_BYTES
            check(
                "within_allowance",
                within,
                f"NVML: the capped child holds {'?' if used is None else f'{used / GIB:.2f}'} "
                f"GiB on GPU {k} (cap {cap_gib:g} GiB + allowance)",
            )
            spared = CapWatchdog(registry, grace_s=0.0).check(backend.read(), 0.0) == []
            fraction_ok = (
                check("watchdog_spares_capped", spared, "the capped child is left alone")
                and fraction_ok
                and within
            )
        finally:
            _end_child(child)

        print(f"hog: a child registered at {cap_gib:g} GiB allocates {hog_gib:g} GiB")
        hog, hog_info = _start_child(k, "--hog-child", "--alloc-gib", str(hog_gib))
        try:
            if hog_info is None:
                check("hog_child", False, f"no READY (exit status {hog.wait()})")
                return fraction_ok, False
            verdict = Path(tmp) / "hog.json"
            register_cap(registry, "job", "hog", hog_info["pid"], [k], cap_bytes, verdict)
            watchdog = CapWatchdog(registry, grace_s=1.0)
            deadline = time.monotonic() + timeout_s
            while hog.poll() is None and time.monotonic() < deadline:
                watchdog.check(backend.read(), time.monotonic())
                time.sleep(0.5)
            code = hog.poll()
        finally:
            _end_child(hog)
        reason = read_verdict(verdict)
        pattern = (
            rf"used \d+\.\d GiB on GPU {k}, asked for {round(cap_gib, 2):g} GiB; "
            r"raise resources\.gpu_memory_gb"
        )
        stopped = check(
            "watchdog_stopped",
            code == -signal.SIGKILL
            and reason is not None
            and re.fullmatch(pattern, reason) is not None,
            f"hog exit status {code}; reason: {reason!r}"
            + ("" if reason else " (NVML lists no such pid: a different pid namespace?)"),
        )
    return fraction_ok, stopped


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
    parser.add_argument("--cap-gib", type=float, default=2.0, help="the cap to enforce")
    parser.add_argument("--hog-gib", type=float, default=5.0, help="what the over-cap child takes")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fraction-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hog-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    alloc_bytes = int(args.alloc_gib * GIB)
    if args.child:
        return child_main(alloc_bytes, args.steps)
    if args.fraction_child:
        return fraction_child(int(args.cap_gib * GIB))
    if args.hog_child:
        return hog_child(alloc_bytes)
    if args.hog_gib * GIB <= args.cap_gib * GIB + CONTEXT_ALLOWANCE_BYTES:
        parser.error("--hog-gib must exceed --cap-gib plus the 1 GiB CUDA-context allowance")

    backend = NvmlBackend()
    try:
        before = backend.read()
    except NvmlUnavailable as exc:
        print(f"no GPU here: NVML unavailable, nothing to check: {exc}")
        print(_NO_GPU)
        return 2
    print(f"NVML sees {len(before)} GPU(s):")
    for gpu in before:
        print(describe(gpu))
    if not before:
        print("no GPU here: NVML sees none, nothing to check")
        print(_NO_GPU)
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

    results = []
    if info is None or not during:
        backend.close()
        check("child", False, f"no READY from the child (exit status {child.returncode})")
        print(
            f"RESULT gpu_check gpus={len(before)} visible_only_k=false memory_seen=false "
            "fraction_enforced=false watchdog_stopped=false"
        )
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
    try:
        caps = check_caps(
            backend, k, int(args.cap_gib * GIB), int(args.hog_gib * GIB), args.timeout_s
        )
    finally:
        backend.close()
    results += caps
    print(
        f"RESULT gpu_check gpus={len(before)} visible_only_k={str(visible_ok).lower()} "
        f"memory_seen={str(memory_seen).lower()} fraction_enforced={str(caps[0]).lower()} "
        f"watchdog_stopped={str(caps[1]).lower()}"
    )
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
