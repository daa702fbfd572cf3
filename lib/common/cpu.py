"""What this machine's CPU reports about itself (Linux ``/proc/cpuinfo``; empty elsewhere)."""

from __future__ import annotations

import functools


@functools.cache
def cpu_field(name: str) -> str:
    """The value of ``name`` for the first processor (``vendor_id``: ``GenuineIntel``, ``AuthenticAMD``; ``flags``: its
    instruction sets, space-separated), or ``""`` where the file or the field is absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""
