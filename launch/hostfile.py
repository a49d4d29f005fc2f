"""python -m launch.hostfile: write the list of hosts and slots (worker processes per host) for horovodrun.

    python -m launch.hostfile --nodes node1:4,node2:4 --output hostfile
    horovodrun -np 8 --hostfile hostfile python -m distributed.train --data prepared/kermany

Horovod's host-file format is one `HOST slots=N` line per host, with no comments or blank lines (horovodrun's
own parser reads every line). The pure functions here are reused by launch.local and launch.slurm.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from launch.common import write_generated
from cxrscale.errors import CxrError
from cxrscale.cli import OneLineParser, run_cli

Host = tuple[str, int]  # (host name or address, slots)

_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_ENTRY = re.compile(r"^(?P<host>[^\s:]+)(?::(?P<colon>\S+)|\s+slots=(?P<slots>\S+))?$")


def parse_nodes(text: str, default_slots: int = 1, source: str = "--nodes") -> list[Host]:
    """Hosts from `a:4,b:4`, or from lines `a`, `a:4` or `a slots=4` (a hostfile); `#` starts a comment.

    Raises `CxrError` naming the entry for a malformed entry, slots < 1, a duplicate host or an empty list.
    """
    if default_slots < 1:
        raise CxrError(f"--slots must be at least 1, got {default_slots}")
    hosts: list[Host] = []
    seen: set[str] = set()
    for line in text.splitlines():
        for entry in line.split("#", 1)[0].split(","):
            entry = entry.strip()
            if not entry:
                continue
            match = _ENTRY.match(entry)
            if not match or not _HOST.match(match["host"]):
                raise CxrError(f"{source}: {entry!r} is not a host entry; write HOST, HOST:SLOTS or "
                               f"HOST slots=SLOTS, e.g. node1:4")
            host, slots_text = match["host"], match["colon"] or match["slots"]
            try:
                slots = int(slots_text) if slots_text is not None else default_slots
            except ValueError:
                raise CxrError(f"{source}: {entry!r} has slots {slots_text!r}; slots must be a whole number "
                               f"of worker processes, e.g. {host}:4") from None
            if slots < 1:
                raise CxrError(f"{source}: {entry!r} has {slots} slots; a host needs at least 1")
            if host in seen:
                raise CxrError(f"{source}: host {host!r} is listed twice; give each host once with its total "
                               f"slots, e.g. {host}:8")
            seen.add(host)
            hosts.append((host, slots))
    if not hosts:
        raise CxrError(f"{source} lists no hosts; give e.g. node1:4,node2:4")
    return hosts


def read_hostfile(path: str | Path, default_slots: int = 1, option: str = "--hostfile") -> list[Host]:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise CxrError(f"{option} {path} cannot be read: {err.strerror or err}") from None
    return parse_nodes(text, default_slots, source=f"{option} {path}")


def format_hostfile(hosts: Sequence[Host]) -> str:
    """Horovod's --hostfile format: `host slots=N`, one line per host."""
    return "".join(f"{host} slots={slots}\n" for host, slots in hosts)


def horovod_hosts_arg(hosts: Sequence[Host]) -> str:
    """horovodrun's -H value: `a:4,b:4`."""
    return ",".join(f"{host}:{slots}" for host, slots in hosts)


def total_slots(hosts: Sequence[Host]) -> int:
    return sum(slots for _, slots in hosts)


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list such as `gpu[01-03,07],login1` (what `scontrol show hostnames` prints,
    for machines without scontrol). Ranges keep their zero padding; several bracket groups multiply."""
    names: list[str] = []
    depth, start = 0, 0
    for i, char in enumerate(nodelist + ","):
        depth += (char == "[") - (char == "]")
        if char == "," and depth == 0:
            part = nodelist[start:i].strip()
            if part:
                names += _expand_one(part, nodelist)
            start = i + 1
    if depth != 0 or not names:
        raise CxrError(f"SLURM_JOB_NODELIST {nodelist!r} is not a Slurm node list such as node[1-4]")
    return names


def _expand_one(part: str, whole: str) -> list[str]:
    match = re.match(r"^([^\[\]]*)\[([^\[\]]+)\](.*)$", part)
    if not match:
        if "[" in part or "]" in part:
            raise CxrError(f"SLURM_JOB_NODELIST {whole!r} is not a Slurm node list such as node[1-4]")
        return [part]
    prefix, ranges, rest = match.groups()
    out = []
    for item in ranges.split(","):
        low, _, high = item.partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise CxrError(f"SLURM_JOB_NODELIST {whole!r} has a bad range [{ranges}]")
        for number in range(int(low), int(high or low) + 1):
            for tail in _expand_one(rest, whole) if rest else [""]:
                out.append(f"{prefix}{number:0{len(low)}d}{tail}")
    return out


def slurm_hostnames(env: Mapping[str, str] | None = None) -> list[str]:
    """The nodes of the current Slurm job: `scontrol show hostnames`, or our own expansion without it."""
    env = os.environ if env is None else env
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise CxrError("--from-slurm: SLURM_JOB_NODELIST is not set; run inside a Slurm job (sbatch/salloc) "
                       "or give --nodes")
    scontrol = shutil.which("scontrol", path=env.get("PATH"))
    if scontrol:
        result = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()
    return expand_nodelist(nodelist)


# Horovod elastic asks its --host-discovery-script every second for the hosts usable now, one HOST:SLOTS per
# line; a host that disappears from the output is removed from the job, one that appears is added.
_AWK_HOSTFILE = ("awk '{ sub(/#.*/, \"\"); n = split($0, fields, /[ \\t,]+/); for (i = 1; i <= n; i++) { "
                 "entry = fields[i]; if (entry == \"\") continue; "
                 "if (entry ~ /^slots=/) { slots[last] = substr(entry, 7); "
                 "continue } split(entry, part, \":\"); last = part[1]; order[++count] = last; "
                 "slots[last] = (part[2] != \"\") ? part[2] : DEFAULT } } "
                 "END { for (i = 1; i <= count; i++) print order[i] \":\" slots[order[i]] }' DEFAULT=%d %s")


def discovery_script(*, hosts: Sequence[Host] | None = None, hostfile: str | Path | None = None,
                     slurm: bool = False, slots: int = 1) -> str:
    """A shell script for horovodrun --host-discovery-script (no Python: it runs every second):
    - hosts: a fixed list;
    - hostfile: the file read at every call, so editing it (a node added, a failed one removed) changes the job
      (HOST, HOST:SLOTS or 'HOST slots=N' lines, as this module writes and the MPI operator's /etc/mpi/hostfile);
    - slurm: the nodes of this Slurm job that respond now (sinfo --responding), `slots` each."""
    head = ("#!/bin/sh\n# written by python -m launch.hostfile: the hosts Horovod elastic may use now, HOST:SLOTS "
            "per line\n")
    if hosts:
        return head + "".join(f"echo {shlex.quote(f'{host}:{n}')}\n" for host, n in hosts)
    if hostfile is not None:
        path = shlex.quote(str(Path(hostfile).resolve()))
        return head + f"[ -r {path} ] || exit 0  # no file: no hosts for now\n" + _AWK_HOSTFILE % (slots, path) + "\n"
    if slurm:
        return head + ('nodes=${SLURM_JOB_NODELIST:?run inside the Slurm job}\n'
                       f'for host in $(sinfo --noheader --Node --responding --nodes="$nodes" --format=%n '
                       f'--states=alloc,mix,idle,comp 2>/dev/null | sort -u); do echo "$host:{slots}"; done\n')
    raise CxrError("a discovery script needs hosts, a hosts file or a Slurm job")


def write_discovery_script(path: str | Path, text: str) -> Path:
    path = Path(path)
    write_generated(path, text, overwrite=True, option="--discovery-script")
    path.chmod(0o755)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m launch.hostfile", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Horovod host file (one 'HOST slots=N' line per host) for horovodrun --hostfile, "
                    "or print it when --output is not given.",
        epilog="examples:\n"
               "  python -m launch.hostfile --nodes node1:4,node2:4 --output hostfile\n"
               "  python -m launch.hostfile --nodes node1,node2,node3 --slots 8\n"
               "  python -m launch.hostfile --nodes-file nodes.txt --output hostfile   # lines: node1:4 or "
               "'node1 slots=4'\n"
               "  python -m launch.hostfile --from-slurm --slots 4 --output hostfile   # inside an sbatch job\n"
               "  python -m launch.hostfile --nodes-file nodes.txt --discovery-script discover.sh   # elastic\n"
               "  horovodrun -np 8 --hostfile hostfile python -m distributed.train --data prepared/kermany")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--nodes", help="comma-separated HOST or HOST:SLOTS, e.g. node1:4,node2:4")
    source.add_argument("--nodes-file", help="file with one host per line: HOST, HOST:SLOTS or HOST slots=N")
    source.add_argument("--from-slurm", action="store_true",
                        help="the nodes of this Slurm job ($SLURM_JOB_NODELIST, via scontrol show hostnames)")
    parser.add_argument("--slots", type=int, default=1,
                        help="slots (worker processes, usually GPUs) of hosts given without :SLOTS (default 1)")
    parser.add_argument("--output", help="host file to write (default: print to stdout)")
    parser.add_argument("--discovery-script", metavar="PATH",
                        help="write instead an executable host discovery script for Horovod elastic "
                             "(horovodrun --host-discovery-script): --nodes fixed, --nodes-file re-read at every "
                             "call, --from-slurm the job's responding nodes at every call")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.discovery_script:
        if args.nodes_file:
            read_hostfile(args.nodes_file, args.slots, option="--nodes-file")  # refuse a bad file now
        text = discovery_script(hosts=parse_nodes(args.nodes, args.slots) if args.nodes else None,
                                hostfile=args.nodes_file, slurm=args.from_slurm, slots=args.slots)
        write_discovery_script(args.discovery_script, text)
        print(f"wrote {args.discovery_script}; use it with\n  horovodrun -np N --min-np A --max-np B "
              f"--host-discovery-script {args.discovery_script} python -m distributed.train --elastic --data ...")
        return 0
    if args.from_slurm:
        hosts = parse_nodes(",".join(slurm_hostnames()), args.slots, source="--from-slurm")
    elif args.nodes_file:
        hosts = read_hostfile(args.nodes_file, args.slots, option="--nodes-file")
    else:
        hosts = parse_nodes(args.nodes, args.slots)
    text = format_hostfile(hosts)
    if not args.output:
        sys.stdout.write(text)
        return 0

    write_generated(args.output, text, overwrite=True)
    print(f"wrote {args.output}: {len(hosts)} hosts, {total_slots(hosts)} slots; use it with\n"
          f"  horovodrun -np {total_slots(hosts)} --hostfile {args.output} python -m distributed.train --data ...\n"
          f"  python -m launch.local --np {total_slots(hosts)} --hostfile {args.output} -- distributed.train "
          f"--data ...")
    return 0


if __name__ == "__main__":
    run_cli(main)
