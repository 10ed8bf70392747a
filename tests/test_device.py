"""Device facts: the parsers against captured macOS / Linux output, and detect() on this host."""

from __future__ import annotations

import platform

from mlxring.ring.machine import (
    DeviceFacts,
    detect,
    parse_cpuinfo,
    parse_meminfo,
    parse_system_profiler,
    parse_vm_stat,
)

# `system_profiler SPDisplaysDataType -json` on a MacBook Pro, M2 Max (38-core GPU).
M2_MAX_SYSTEM_PROFILER = """\
{
  "SPDisplaysDataType" : [
    {
      "_name" : "Apple M2 Max",
      "spdisplays_mtlgpufamilysupport" : "spdisplays_metal3",
      "spdisplays_ndrvs" : [
        {
          "_name" : "Color LCD",
          "_spdisplays_display-product-id" : "a050",
          "_spdisplays_display-serial-number" : "fd626d62",
          "_spdisplays_display-vendor-id" : "610",
          "_spdisplays_display-week" : "0",
          "_spdisplays_display-year" : "0",
          "_spdisplays_displayID" : "1",
          "_spdisplays_pixels" : "3456 x 2234",
          "_spdisplays_resolution" : "1728 x 1117 @ 120.00Hz",
          "spdisplays_ambient_brightness" : "spdisplays_yes",
          "spdisplays_connection_type" : "spdisplays_internal",
          "spdisplays_display_type" : "spdisplays_built-in-liquid-retina-xdr",
          "spdisplays_main" : "spdisplays_yes",
          "spdisplays_mirror" : "spdisplays_off",
          "spdisplays_online" : "spdisplays_yes",
          "spdisplays_pixelresolution" : "spdisplays_3456x2234Retina"
        }
      ],
      "spdisplays_vendor" : "sppci_vendor_Apple",
      "sppci_bus" : "spdisplays_builtin",
      "sppci_cores" : "38",
      "sppci_device_type" : "spdisplays_gpu",
      "sppci_model" : "Apple M2 Max"
    }
  ]
}
"""

# An Intel MacBook Pro: two GPUs, neither reports a core count.
INTEL_MAC_SYSTEM_PROFILER = """\
{
  "SPDisplaysDataType" : [
    {
      "_name" : "Intel UHD Graphics 630",
      "spdisplays_automatic_graphics_switching" : "spdisplays_supported",
      "spdisplays_device-id" : "0x3e9b",
      "spdisplays_gmux-version" : "5.0.0",
      "spdisplays_mtlgpufamilysupport" : "spdisplays_metal3",
      "spdisplays_vendor" : "Intel",
      "spdisplays_vram_shared" : "1536 MB",
      "sppci_bus" : "spdisplays_builtin",
      "sppci_device_type" : "spdisplays_gpu",
      "sppci_model" : "Intel UHD Graphics 630"
    },
    {
      "_name" : "AMD Radeon Pro 5500M",
      "spdisplays_device-id" : "0x7340",
      "spdisplays_pcie_width" : "x8",
      "spdisplays_vendor" : "sppci_vendor_amd",
      "spdisplays_vram" : "4 GB",
      "sppci_bus" : "spdisplays_pcie_device",
      "sppci_device_type" : "spdisplays_gpu",
      "sppci_model" : "AMD Radeon Pro 5500M"
    }
  ]
}
"""

# `vm_stat` on the same M2 Max (64 GB, 16 KiB pages).
M2_MAX_VM_STAT = """\
Mach Virtual Memory Statistics: (page size of 16384 bytes)
Pages free:                               52184.
Pages active:                           1386249.
Pages inactive:                         1340410.
Pages speculative:                        45012.
Pages throttled:                              0.
Pages wired down:                        242816.
Pages purgeable:                          40561.
"Translation faults":                 581274617.
Pages copy-on-write:                   18405330.
Pages zero filled:                    279126357.
Pages reactivated:                      6230163.
Pages purged:                           2710357.
File-backed pages:                      1094815.
Anonymous pages:                        1676856.
Pages stored in compressor:              512345.
Pages occupied by compressor:            130021.
Decompressions:                         4351234.
Compressions:                           6123457.
Pageins:                               12345678.
Pageouts:                                 54321.
Swapins:                                      0.
Swapouts:                                     0.
"""

LINUX_MEMINFO = """\
MemTotal:       32780412 kB
MemFree:         1234567 kB
MemAvailable:   20971520 kB
Buffers:          345678 kB
Cached:         17890123 kB
SwapCached:            0 kB
Active:          9876543 kB
Inactive:       12345678 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
"""

LINUX_CPUINFO = """\
processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
stepping\t: 0

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
"""


def test_system_profiler_m2_max_has_38_gpu_cores() -> None:
    assert parse_system_profiler(M2_MAX_SYSTEM_PROFILER) == 38


def test_system_profiler_without_apple_gpu_or_garbage_is_none() -> None:
    assert parse_system_profiler(INTEL_MAC_SYSTEM_PROFILER) is None
    assert parse_system_profiler("") is None
    assert parse_system_profiler("not json") is None
    assert parse_system_profiler('{"SPDisplaysDataType": 3}') is None
    assert parse_system_profiler("[1, 2]") is None
    bad_cores = M2_MAX_SYSTEM_PROFILER.replace('"38"', '"many"')
    assert parse_system_profiler(bad_cores) is None


def test_vm_stat_available_is_free_inactive_speculative() -> None:
    assert parse_vm_stat(M2_MAX_VM_STAT) == (52184 + 1340410 + 45012) * 16384


def test_vm_stat_intel_page_size_and_garbage() -> None:
    intel = M2_MAX_VM_STAT.replace("16384", "4096")
    assert parse_vm_stat(intel) == (52184 + 1340410 + 45012) * 4096
    assert parse_vm_stat("") is None
    assert parse_vm_stat(M2_MAX_VM_STAT.replace("Pages speculative", "Pages speculated")) is None
    header_only = M2_MAX_VM_STAT.splitlines()[0]
    assert parse_vm_stat(header_only) is None


def test_meminfo_and_cpuinfo() -> None:
    assert parse_meminfo(LINUX_MEMINFO) == (32780412 * 1024, 20971520 * 1024)
    old_kernel = "\n".join(ln for ln in LINUX_MEMINFO.splitlines() if "Available" not in ln)
    assert parse_meminfo(old_kernel) == (32780412 * 1024, None)
    assert parse_meminfo("") == (None, None)
    assert parse_cpuinfo(LINUX_CPUINFO) == "AMD EPYC 7B13"
    assert parse_cpuinfo("processor\t: 0\nBogoMIPS\t: 50.00\n") is None


def test_detect_on_this_machine_is_sane() -> None:
    facts = detect()
    assert isinstance(facts, DeviceFacts)
    assert facts.system == platform.system()
    # Between 256 MiB and 64 TiB: a real machine, in bytes (not kB or pages).
    assert 256 * 2**20 < facts.total_memory_bytes < 64 * 2**40
    if facts.available_memory_bytes is not None:
        assert 0 < facts.available_memory_bytes <= facts.total_memory_bytes
    if facts.system == "Linux":
        assert facts.available_memory_bytes is not None
        assert facts.gpu_cores is None
    if facts.gpu_cores is not None:
        assert 1 <= facts.gpu_cores <= 1024
    assert facts.chip is None or facts.chip.strip() == facts.chip != ""
