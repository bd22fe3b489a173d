"""What a runner reports about its machine: GPUs from nvidia-smi's XML, CPUs and memory from cgroups."""

from __future__ import annotations

from pathlib import Path

import pytest

from dstack.core.resources import Gpu
from dstack.runner.resources import (
    cgroup_limits,
    detect_resources,
    parse_meminfo_total_mib,
    parse_nvidia_smi_xml,
)

# `nvidia-smi -q -x` on an AWS p3.8xlarge-like machine (driver 470), trimmed to two GPUs.
# bar1_memory_usage also has a <total>, and must not be taken for the GPU's memory.
NVIDIA_SMI_V100_X2 = """\
<?xml version="1.0" ?>
<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_v11.dtd">
<nvidia_smi_log>
	<timestamp>Tue Jun 14 09:41:27 2022</timestamp>
	<driver_version>470.57.02</driver_version>
	<cuda_version>11.4</cuda_version>
	<attached_gpus>2</attached_gpus>
	<gpu id="00000000:00:1B.0">
		<product_name>Tesla V100-SXM2-16GB</product_name>
		<product_brand>Tesla</product_brand>
		<display_mode>Enabled</display_mode>
		<display_active>Disabled</display_active>
		<persistence_mode>Enabled</persistence_mode>
		<mig_mode>
			<current_mig>N/A</current_mig>
			<pending_mig>N/A</pending_mig>
		</mig_mode>
		<mig_devices>
			None
		</mig_devices>
		<accounting_mode>Disabled</accounting_mode>
		<accounting_mode_buffer_size>4000</accounting_mode_buffer_size>
		<serial>0323217023617</serial>
		<uuid>GPU-2cb3a1e2-1b2c-3d4e-5f60-718293a4b5c6</uuid>
		<minor_number>0</minor_number>
		<vbios_version>88.00.4F.00.09</vbios_version>
		<multigpu_board>No</multigpu_board>
		<board_id>0x1b</board_id>
		<pci>
			<pci_bus>00</pci_bus>
			<pci_device>1B</pci_device>
			<pci_domain>0000</pci_domain>
			<pci_device_id>1DB110DE</pci_device_id>
			<pci_bus_id>00000000:00:1B.0</pci_bus_id>
			<pci_sub_system_id>121210DE</pci_sub_system_id>
		</pci>
		<fan_speed>N/A</fan_speed>
		<performance_state>P0</performance_state>
		<fb_memory_usage>
			<total>16160 MiB</total>
			<used>0 MiB</used>
			<free>16160 MiB</free>
		</fb_memory_usage>
		<bar1_memory_usage>
			<total>16384 MiB</total>
			<used>2 MiB</used>
			<free>16382 MiB</free>
		</bar1_memory_usage>
		<compute_mode>Default</compute_mode>
		<utilization>
			<gpu_util>0 %</gpu_util>
			<memory_util>0 %</memory_util>
			<encoder_util>0 %</encoder_util>
			<decoder_util>0 %</decoder_util>
		</utilization>
		<temperature>
			<gpu_temp>34 C</gpu_temp>
			<gpu_temp_max_threshold>85 C</gpu_temp_max_threshold>
		</temperature>
		<power_readings>
			<power_state>P0</power_state>
			<power_draw>42.43 W</power_draw>
			<power_limit>300.00 W</power_limit>
		</power_readings>
		<processes>
		</processes>
	</gpu>

	<gpu id="00000000:00:1C.0">
		<product_name>Tesla V100-SXM2-16GB</product_name>
		<product_brand>Tesla</product_brand>
		<display_mode>Enabled</display_mode>
		<persistence_mode>Enabled</persistence_mode>
		<uuid>GPU-7f1e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b</uuid>
		<minor_number>1</minor_number>
		<fb_memory_usage>
			<total>16160 MiB</total>
			<used>1024 MiB</used>
			<free>15136 MiB</free>
		</fb_memory_usage>
		<bar1_memory_usage>
			<total>16384 MiB</total>
			<used>2 MiB</used>
			<free>16382 MiB</free>
		</bar1_memory_usage>
		<processes>
			<process_info>
				<pid>20431</pid>
				<type>C</type>
				<process_name>python3</process_name>
				<used_memory>1021 MiB</used_memory>
			</process_info>
		</processes>
	</gpu>

</nvidia_smi_log>
"""


def test_nvidia_smi_xml_gives_each_gpu_with_its_framebuffer_memory():
    assert parse_nvidia_smi_xml(NVIDIA_SMI_V100_X2) == [
        Gpu(name="Tesla V100-SXM2-16GB", memory_mib=16160),
        Gpu(name="Tesla V100-SXM2-16GB", memory_mib=16160),
    ]


def test_nvidia_smi_xml_of_a_machine_without_gpus_is_an_empty_list():
    text = '<?xml version="1.0" ?>\n<nvidia_smi_log><attached_gpus>0</attached_gpus></nvidia_smi_log>'
    assert parse_nvidia_smi_xml(text) == []


def test_nvidia_smi_memory_that_is_not_a_size_counts_as_zero():
    text = (
        "<nvidia_smi_log><gpu><product_name>X</product_name><fb_memory_usage><total>N/A</total>"
        "</fb_memory_usage></gpu></nvidia_smi_log>"
    )
    assert parse_nvidia_smi_xml(text) == [Gpu(name="X", memory_mib=0)]


def test_nvidia_smi_output_that_is_not_xml_is_a_value_error():
    with pytest.raises(ValueError, match="not XML"):
        parse_nvidia_smi_xml("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.")


def test_meminfo_total_is_read_in_mib():
    assert parse_meminfo_total_mib("MemTotal:       16337596 kB\nMemFree:  1 kB\n") == 15954


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_cgroup_v2_limits_round_cpus_up_and_give_memory_in_mib(tmp_path):
    root = _tree(
        tmp_path,
        {
            "cgroup.controllers": "cpu memory",
            "runner.slice/cpu.max": "150000 100000\n",
            "runner.slice/memory.max": str(4 * 1024**3) + "\n",
        },
    )
    assert cgroup_limits("0::/runner.slice\n", root) == (2, 4096)


def test_cgroup_v2_without_limits_gives_none(tmp_path):
    root = _tree(tmp_path, {"cgroup.controllers": "", "cpu.max": "max 100000", "memory.max": "max"})
    assert cgroup_limits("0::/\n", root) == (None, None)


def test_cgroup_v1_limits_of_a_container_are_read_at_the_mount_root(tmp_path):
    # inside a container the path in /proc/self/cgroup is the host's; the mount shows its own cgroup
    root = _tree(
        tmp_path,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "400000",
            "cpu,cpuacct/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": str(512 * 1024**2),
        },
    )
    proc = "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/system.slice/docker-abc.scope\n"
    assert cgroup_limits(proc, root) == (4, 512)


def test_cgroup_v1_unlimited_is_none(tmp_path):
    root = _tree(
        tmp_path,
        {
            "cpu/cpu.cfs_quota_us": "-1",
            "cpu/cpu.cfs_period_us": "100000",
            "memory/memory.limit_in_bytes": "9223372036854771712",
        },
    )
    assert cgroup_limits("4:memory:/\n1:cpu:/\n", root) == (None, None)


def test_this_machine_reports_cpus_and_memory():
    resources = detect_resources()
    assert resources.cpus >= 1
    assert resources.memory_mib > 0
    assert isinstance(resources.docker, bool)


def test_a_captured_inventory_stands_for_the_gpus(tmp_path, monkeypatch):
    from dstack.runner.resources import detect_gpus

    (tmp_path / "smi.xml").write_text(NVIDIA_SMI_V100_X2)
    monkeypatch.setenv("DSTACK_GPU_INVENTORY", str(tmp_path / "smi.xml"))
    assert [g.name for g in detect_gpus()] == ["Tesla V100-SXM2-16GB"] * 2
