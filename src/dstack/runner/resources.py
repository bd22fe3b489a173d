"""What this machine offers jobs: CPUs, memory, GPUs, Docker. Reported when the runner registers.

GPUs come from NVML (the `nvidia-ml-py` package, optional) and, where it is missing or fails,
from `nvidia-smi -q -x`. CPUs and memory honour the runner's cgroup limits (v1 or v2), as a runner
inside a container (the `docker` backend) must not offer the whole host.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from dstack.core.resources import Gpu, RunnerResources

log = logging.getLogger(__name__)

_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNIT_MIB = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def detect_resources() -> RunnerResources:
    global _prefetched
    if _prefetched is not None:  # looked at moments ago, by a spare runner process
        found, _prefetched = _prefetched, None
        return found
    return RunnerResources(
        cpus=detect_cpus(),
        memory_mib=detect_memory_mib(),
        gpus=detect_gpus(),
        docker=docker_available(),
        host_user=host_user(),
    )


_prefetched: RunnerResources | None = None


def prefetch() -> None:
    """Look at the machine now, for the next `detect_resources()` (a spare runner process, made ahead of need)."""
    global _prefetched
    _prefetched = detect_resources()


def host_user() -> str | None:
    """The user this runner runs as, and so the user jobs without an image run as."""
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid without a name (a container's)
        return f"uid {os.geteuid()}"


def detect_cpus() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit, _ = _own_cgroup_limits()
    allocated = slurm_allocation()[0]
    limit = min(x for x in (limit, allocated) if x) if limit or allocated else None
    return max(1, min(cpus, limit)) if limit else cpus


def detect_memory_mib() -> int:
    meminfo = Path("/proc/meminfo")
    total = parse_meminfo_total_mib(meminfo.read_text()) if meminfo.exists() else 0
    _, limit = _own_cgroup_limits()
    allocated = slurm_allocation()[1]
    limit = min(x for x in (limit, allocated) if x) if limit or allocated else None
    return min(total, limit) if limit and total else (limit or total)


def slurm_allocation(env: dict[str, str] | None = None) -> tuple[int | None, int | None]:
    """(CPUs, MiB) of this node that the Slurm job the runner runs in was given (a cluster whose task plugin
    sets no affinity nor cgroup would show the whole node): SLURM_CPUS_ON_NODE, SLURM_MEM_PER_NODE or
    SLURM_MEM_PER_CPU x CPUs (in MB, as Slurm counts them). (None, None) outside Slurm."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None, None

    def number(key: str) -> int | None:
        value = env.get(key, "").split("(")[0].split(",")[0]
        return int(value) if value.isdigit() and int(value) > 0 else None

    cpus = number("SLURM_CPUS_ON_NODE")
    memory = number("SLURM_MEM_PER_NODE")
    if memory is None and (per_cpu := number("SLURM_MEM_PER_CPU")) and cpus:
        memory = per_cpu * cpus
    return cpus, memory


def parse_meminfo_total_mib(text: str) -> int:
    """MemTotal of /proc/meminfo (in kB there) in MiB."""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 0


def _own_cgroup_limits() -> tuple[int | None, int | None]:
    try:
        return cgroup_limits(Path("/proc/self/cgroup").read_text())
    except OSError:  # not Linux
        return None, None


def cgroup_limits(
    proc_self_cgroup: str, root: Path = Path("/sys/fs/cgroup")
) -> tuple[int | None, int | None]:
    """(CPUs rounded up, memory MiB) that the cgroup of /proc/self/cgroup allows; None where unlimited
    or unknown. cgroup v2 (`cpu.max`, `memory.max`) and v1 (`cpu.cfs_quota_us`, `memory.limit_in_bytes`)."""
    paths: dict[str, str] = {}  # controller ("" for v2) -> the cgroup's path
    for line in proc_self_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(","):
                paths[controller] = parts[2].strip().lstrip("/")
    if (root / "cgroup.controllers").exists():
        folder = _cgroup_folder(root, paths.get(""))
        cpu_max = _read(folder / "cpu.max").split()
        cpus = _cpus(cpu_max[0], cpu_max[1]) if len(cpu_max) == 2 and cpu_max[0] != "max" else None
        return cpus, _mib(_read(folder / "memory.max"))
    cpu_root = next(
        (root / n for n in ("cpu", "cpu,cpuacct", "cpuacct,cpu") if (root / n).is_dir()), root / "cpu"
    )
    cpu_folder = _cgroup_folder(cpu_root, paths.get("cpu"))
    cpus = _cpus(_read(cpu_folder / "cpu.cfs_quota_us"), _read(cpu_folder / "cpu.cfs_period_us"))
    memory_folder = _cgroup_folder(root / "memory", paths.get("memory"))
    return cpus, _mib(_read(memory_folder / "memory.limit_in_bytes"))


def _cgroup_folder(mount: Path, path: str | None) -> Path:
    """The cgroup's folder; inside a container the mount shows the container's own cgroup at its root."""
    if path and (mount / path).is_dir():
        return mount / path
    return mount


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def _mib(limit_bytes: str) -> int | None:
    if not limit_bytes.isdigit() or int(limit_bytes) >= 2**62:  # v1 writes "no limit" as ~2**63
        return None
    return int(limit_bytes) // (1024 * 1024)


GPU_INVENTORY = "DSTACK_GPU_INVENTORY"  # a file of `nvidia-smi -q -x` output, read instead of asking the GPUs


def detect_gpus() -> list[Gpu]:
    """The machine's GPUs, numbered as NVML and nvidia-smi number them. With DSTACK_GPU_INVENTORY set, those of
    that captured `nvidia-smi -q -x` output instead (tests; a machine whose driver dstack cannot ask)."""
    inventory = os.environ.get(GPU_INVENTORY)
    if inventory:
        return parse_nvidia_smi_xml(Path(inventory).read_text())
    gpus = _gpus_from_nvml()
    if gpus is None:
        gpus = _gpus_from_nvidia_smi()
    return gpus or []


def _gpus_from_nvml() -> list[Gpu] | None:
    """None when NVML is not at hand (package missing, no driver): then ask nvidia-smi."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        log.debug("NVML unavailable: %s", e)
        return None
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):  # older nvidia-ml-py
                name = name.decode()
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle).total // (1024 * 1024)
            gpus.append(Gpu(name=name, memory_mib=memory))
        return gpus
    except Exception as e:
        log.warning("NVML failed to list GPUs, trying nvidia-smi: %s", e)
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _gpus_from_nvidia_smi() -> list[Gpu]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        result = subprocess.run([exe, "-q", "-x"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("nvidia-smi failed: %s", e)
        return []
    if result.returncode != 0:
        log.warning(
            "nvidia-smi failed (exit %s): %s",
            result.returncode,
            result.stderr.strip() or result.stdout.strip(),
        )
        return []
    try:
        return parse_nvidia_smi_xml(result.stdout)
    except ValueError as e:
        log.warning("could not read the output of nvidia-smi -q -x: %s", e)
        return []


def parse_nvidia_smi_xml(text: str) -> list[Gpu]:
    """The GPUs listed by `nvidia-smi -q -x`: product name and total framebuffer memory."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ValueError(f"not XML: {e}") from e
    gpus = []
    for gpu in root.findall("gpu"):
        name = (gpu.findtext("product_name") or "").strip()
        total = gpu.findtext("fb_memory_usage/total") or ""
        gpus.append(Gpu(name=name or "unknown", memory_mib=_memory_mib(total)))
    return gpus


def _memory_mib(value: str) -> int:
    """'16160 MiB' -> 16160; 'N/A' or garbage -> 0."""
    m = _MEMORY.match(value)
    if not m:
        return 0
    unit = (m.group(2) or "M")[0].upper()
    return int(float(m.group(1)) * _UNIT_MIB[unit])


def docker_available(timeout: float = 3.0) -> bool:
    """Whether the Docker Engine answers; False for any failure (no SDK, no socket, no permission). No engine's
    socket and no DOCKER_HOST: False at once (the SDK's import alone is ~100 ms of a runner's start)."""
    if not os.environ.get("DOCKER_HOST") and not os.path.exists("/var/run/docker.sock"):
        return False
    try:
        import docker

        client = docker.from_env(timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False
