"""How many CPUs the suite may use: conftest.py sets the threads from it, and
tests/test_make.py checks `make test`'s workers against it."""
import os


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity, cut to a cgroup (v2) CPU quota
    where one is set (a container may see more CPUs than it may use)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:                 # not Linux
        n = os.cpu_count() or 1
    try:
        with open('/sys/fs/cgroup/cpu.max') as f:
            quota, period = f.read().split()[:2]
        if quota != 'max':
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)
