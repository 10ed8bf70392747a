"""What this machine has: memory, chip, GPU cores — for the planner and for discovery's TXT.

macOS facts come from `sysctl`, `vm_stat` and `system_profiler`; Linux facts from /proc. Every
probe is best effort: a missing tool, a timeout or odd output gives None, never an exception.
Parsing is split into pure functions so tests can feed them a Mac's captured output.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT = 5.0  # seconds per subprocess; system_profiler is the slow one (~0.3-1 s)


@dataclass(frozen=True)
class DeviceFacts:
    total_memory_bytes: int
    available_memory_bytes: int | None
    chip: str | None
    gpu_cores: int | None
    system: str  # platform.system(): "Darwin", "Linux", ...


def parse_system_profiler(json_text: str) -> int | None:
    """GPU cores of the Apple GPU in `system_profiler SPDisplaysDataType -json` output."""
    try:
        data = json.loads(json_text)
    except ValueError:
        return None
    entries = data.get("SPDisplaysDataType") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    for entry in entries:
        if not isinstance(entry, dict) or "sppci_cores" not in entry:
            continue
        # Apple Silicon GPUs say vendor "sppci_vendor_Apple"; an eGPU or Intel Mac's AMD GPU
        # has no core count here anyway, so the vendor check only guards odd entries.
        vendor = str(entry.get("spdisplays_vendor", "")) + str(entry.get("sppci_model", ""))
        if "apple" not in vendor.lower():
            continue
        try:
            return int(str(entry["sppci_cores"]).strip())
        except ValueError:
            return None
    return None


_VM_PAGE_SIZE = re.compile(r"page size of (\d+) bytes")
_VM_LINE = re.compile(r'^"?([^":]+)"?:\s+(\d+)\.?\s*$')


def parse_vm_stat(text: str) -> int | None:
    """Available bytes from `vm_stat`: (free + inactive + speculative pages) x page size.

    Inactive and speculative pages are reclaimable without swapping, which is what Activity
    Monitor's "available" means; purgeable is left out because it is already inside them.
    """
    m = _VM_PAGE_SIZE.search(text)
    if m is None:
        return None
    page = int(m.group(1))
    pages: dict[str, int] = {}
    for line in text.splitlines():
        lm = _VM_LINE.match(line.strip())
        if lm is not None:
            pages[lm.group(1).strip()] = int(lm.group(2))
    keys = ("Pages free", "Pages inactive", "Pages speculative")
    if not all(k in pages for k in keys):
        return None
    return sum(pages[k] for k in keys) * page


def parse_meminfo(text: str) -> tuple[int | None, int | None]:
    """(MemTotal, MemAvailable) in bytes from /proc/meminfo; None where a field is missing."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            scale = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            fields[key.strip()] = int(parts[0]) * scale
    return fields.get("MemTotal"), fields.get("MemAvailable")


def parse_cpuinfo(text: str) -> str | None:
    """The CPU's "model name" from /proc/cpuinfo (x86; most ARM kernels have none)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return None


def _run(*argv: str) -> str | None:
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=PROBE_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:
        return None


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _sysconf_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _detect_macos() -> DeviceFacts:
    total = _int_or_none(_run("sysctl", "-n", "hw.memsize")) or _sysconf_memory() or 0
    chip = (_run("sysctl", "-n", "machdep.cpu.brand_string") or "").strip() or None
    vm = _run("vm_stat")
    profile = _run("system_profiler", "SPDisplaysDataType", "-json")
    return DeviceFacts(
        total_memory_bytes=total,
        available_memory_bytes=parse_vm_stat(vm) if vm is not None else None,
        chip=chip,
        gpu_cores=parse_system_profiler(profile) if profile is not None else None,
        system="Darwin",
    )


def _detect_linux() -> DeviceFacts:
    meminfo = _read("/proc/meminfo")
    total, available = parse_meminfo(meminfo) if meminfo is not None else (None, None)
    cpuinfo = _read("/proc/cpuinfo")
    chip = parse_cpuinfo(cpuinfo) if cpuinfo is not None else None
    return DeviceFacts(
        total_memory_bytes=total or _sysconf_memory() or 0,
        available_memory_bytes=available,
        chip=chip or platform.processor() or None,
        gpu_cores=None,
        system="Linux",
    )


def detect() -> DeviceFacts:
    """This machine's facts (best effort; total memory is 0 only if nothing could tell)."""
    system = platform.system()
    if system == "Darwin":
        return _detect_macos()
    if system == "Linux":
        return _detect_linux()
    return DeviceFacts(
        total_memory_bytes=_sysconf_memory() or 0,
        available_memory_bytes=None,
        chip=platform.processor() or None,
        gpu_cores=None,
        system=system,
    )
