"""launch.hostfile: Horovod host lists from --nodes, a file or a Slurm job."""
from __future__ import annotations

import os
import subprocess

import pytest
from horovod.runner.common.util.hosts import parse_host_files

from launch.hostfile import expand_nodelist, format_hostfile, horovod_hosts_arg, main, parse_nodes
from cxrscale.errors import CxrError
from tests.launch.cli import run_main


def test_parse_format_round_trip():
    hosts = parse_nodes("node1:4, node2 ,10.0.0.7:2", default_slots=8)
    assert hosts == [("node1", 4), ("node2", 8), ("10.0.0.7", 2)]
    assert format_hostfile(hosts) == "node1 slots=4\nnode2 slots=8\n10.0.0.7 slots=2\n"
    assert parse_nodes(format_hostfile(hosts)) == hosts
    assert horovod_hosts_arg(hosts) == "node1:4,node2:8,10.0.0.7:2"


def test_nodes_file_lines_and_comments():
    text = "# GPU nodes\nnode1 slots=4\n\nnode2:2  # half a node\nnode3\n"
    assert parse_nodes(text, default_slots=3) == [("node1", 4), ("node2", 2), ("node3", 3)]


@pytest.mark.parametrize("text, named", [
    ("node1:4,node1:4", "'node1' is listed twice"),
    ("node1:0", "'node1:0' has 0 slots"),
    ("node1 slots=0", "'node1 slots=0' has 0 slots"),
    ("node1:four", "'node1:four' has slots 'four'"),
    ("node1 node2", "'node1 node2' is not a host entry"),
    ("node_1!:4", "'node_1!:4' is not a host entry"),
    (" , ", "lists no hosts"),
])
def test_bad_entries_are_named(text, named):
    with pytest.raises(CxrError, match=named):
        parse_nodes(text)


def test_cli_writes_a_file_horovod_reads(tmp_path, capsys):
    out = tmp_path / "hosts" / "hostfile"
    code, stdout, _ = run_main(main, ["--nodes", "node1:4,node2", "--slots", "2", "--output", str(out)], capsys)
    assert code == 0
    assert out.read_text() == "node1 slots=4\nnode2 slots=2\n"
    assert parse_host_files(str(out)) == "node1:4,node2:2"  # Horovod's own reader
    assert "horovodrun -np 6 --hostfile" in stdout


def test_cli_prints_without_output_and_reads_nodes_file(tmp_path, capsys):
    nodes = tmp_path / "nodes.txt"
    nodes.write_text("a:1\nb slots=3\n")
    code, stdout, _ = run_main(main, ["--nodes-file", str(nodes)], capsys)
    assert (code, stdout) == (0, "a slots=1\nb slots=3\n")


def test_cli_error_names_the_entry(capsys):
    code, _, stderr = run_main(main, ["--nodes", "node1:4,node1:2"], capsys)
    assert code == 2
    assert stderr.startswith("error: --nodes: host 'node1' is listed twice")


def test_slurm_node_lists_expand():
    assert expand_nodelist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_nodelist("r[1-2]-n[8-9]") == ["r1-n8", "r1-n9", "r2-n8", "r2-n9"]
    with pytest.raises(CxrError, match="SLURM_JOB_NODELIST"):
        expand_nodelist("gpu[01-")


def test_from_slurm_without_scontrol(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_NODELIST", "n[1-2]")
    monkeypatch.setenv("PATH", str(tmp_path))  # no scontrol here: our own expansion
    code, stdout, _ = run_main(main, ["--from-slurm", "--slots", "4"], capsys)
    assert (code, stdout) == (0, "n1 slots=4\nn2 slots=4\n")
    monkeypatch.delenv("SLURM_JOB_NODELIST")
    code, _, stderr = run_main(main, ["--from-slurm"], capsys)
    assert code == 2 and "SLURM_JOB_NODELIST is not set" in stderr


def discovered(script) -> dict[str, int]:
    """What Horovod elastic's own reader of a --host-discovery-script makes of the script's output."""
    from horovod.runner.elastic.discovery import HostDiscoveryScript

    return HostDiscoveryScript(str(script), 1).find_available_hosts_and_slots()


def test_discovery_script_reads_its_hosts_file_again_at_every_call(tmp_path, capsys):
    nodes, script = tmp_path / "nodes.txt", tmp_path / "discover.sh"
    nodes.write_text("# the pool\nnode1:4\nnode2 slots=2\nnode3\n")
    code, out, err = run_main(main, ["--nodes-file", str(nodes), "--slots", "8", "--discovery-script", str(script)],
                              capsys)
    assert code == 0, err
    assert discovered(script) == {"node1": 4, "node2": 2, "node3": 8}
    nodes.write_text("node2 slots=2\n")  # node1 and node3 lost
    assert discovered(script) == {"node2": 2}
    nodes.unlink()  # no file for now: no hosts, not an error
    assert discovered(script) == {}


def test_discovery_scripts_from_a_list_and_from_the_slurm_job(tmp_path, capsys):
    fixed = tmp_path / "fixed.sh"
    assert run_main(main, ["--nodes", "a:2,b", "--slots", "3", "--discovery-script", str(fixed)], capsys)[0] == 0
    assert discovered(fixed) == {"a": 2, "b": 3}

    slurm, bin_dir = tmp_path / "slurm.sh", tmp_path / "bin"
    bin_dir.mkdir()
    sinfo = bin_dir / "sinfo"  # Slurm's sinfo stand-in: n2 of the job's n[1-3] does not respond
    sinfo.write_text("#!/bin/sh\ncase \"$*\" in *--responding*--nodes=n\\[1-3\\]*) printf 'n1\\nn3\\nn1\\n';; esac\n")
    sinfo.chmod(0o755)
    assert run_main(main, ["--from-slurm", "--slots", "4", "--discovery-script", str(slurm)], capsys)[0] == 0
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="n[1-3]")
    result = subprocess.run([str(slurm)], capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout == "n1:4\nn3:4\n", result.stderr
