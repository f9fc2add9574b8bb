"""Which TCP / UDP sockets a set of processes holds, from /proc (psutil is not a dependency; Linux only).

``/proc/<pid>/fd/*`` links name socket inodes (``socket:[12345]``); ``/proc/net/{tcp,tcp6,udp,udp6}`` map inodes to
local addresses (hex, each 32-bit word in host byte order) and states (``0A`` = LISTEN for TCP).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
from pathlib import Path

TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "06": "TIME_WAIT", "07": "CLOSE",
              "08": "CLOSE_WAIT", "0A": "LISTEN"}


def descendants(pid: int) -> list[int]:
    """``pid``'s child processes, recursively (not ``pid`` itself)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def decode_address(hex_addr: str) -> str:
    """``0100007F`` -> ``127.0.0.1``; 32 hex digits -> an IPv6 address (``::1``, ``::ffff:127.0.0.1``)."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0]) for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    a = ipaddress.IPv6Address(words)
    return f"::ffff:{a.ipv4_mapped}" if a.ipv4_mapped is not None else str(a)


def inet_sockets(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, local address, state, local port) of every TCP and UDP socket the processes hold (UDP state is
    "UDP")."""
    owner: dict[int, int] = {}
    for pid in pids:
        for ino in socket_inodes(pid):
            owner[ino] = pid
    out = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            ino = int(parts[9])
            if ino not in owner:
                continue
            addr, port = parts[1].split(":")
            state = "UDP" if table.startswith("udp") else TCP_STATES.get(parts[3], parts[3])
            out.append((owner[ino], decode_address(addr), state, int(port, 16)))
    return out
