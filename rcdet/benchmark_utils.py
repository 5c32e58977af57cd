"""Peak-memory helpers for the CPU benchmarks (Linux /proc)."""

import os

__all__ = ["rss_bytes", "peak_rss_bytes", "reset_peak_rss"]


def rss_bytes() -> int:
    """Current resident set size."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    # VmHWM belongs to this address space; ru_maxrss would carry a parent's peak over fork+exec.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0); a no-op where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
