"""Process-wide tuning for `maild serve`: the GIL switch interval and glibc's malloc.

Both are settings of the interpreter and the C library rather than of any
component, so they are made once, here, before the event loop starts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import structlog

log = structlog.get_logger("maild.tuning")

# The event loop and the database writer thread share the GIL. At Python's default
# 5 ms switch interval a commit that releases the GIL for its fsync can wait 5 ms to
# get it back from a busy loop, several times per commit; 0.5 ms keeps the spool's
# commits (and so every 250) from queueing behind SMTP.
SWITCH_INTERVAL = 0.0005

# glibc serves a request of at least M_MMAP_THRESHOLD bytes with its own mmap, and
# gives it back to the system when it is freed. Left alone, the threshold rises to the
# size of each large block freed (up to 32 MiB), so after one 25 MiB message every later
# message buffer comes from the heap, and a heap with a live block near its top is never
# trimmed: seen as 2.5 GB of RSS that stayed after 100 large transfers had ended.
# Setting it fixes it (and turns the rise off): buffers of 256 KiB and more are mapped,
# and unmapped the moment the message is stored.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 * 1024
TRIM_THRESHOLD = 4 * 1024 * 1024


# Whether tune_malloc set the thresholds in this process (the daemon, and each pool
# worker, which parses large mail: a 25 MiB message took a worker from 58 to 216 MiB of
# RSS, and it kept 143 MiB afterwards; tuned, 179 at the peak and back to its start).
tuned = False


def tune_process() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)
    tune_malloc()


def tune_malloc() -> bool:
    """Fix glibc's mmap and trim thresholds; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if not done:
        log.warning("could not set malloc thresholds; large messages may keep memory")
    global tuned
    tuned = done
    return done
