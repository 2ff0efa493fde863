"""Peak memory on a CPU, where no allocator statistic exists: the live bytes of the torch profiler's memory events.

Shared by the benchmarks that report memory on a CPU (``vs_peft.py``, ``gpu_check.py --cpu``); on CUDA they read
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def cpu_peak_bytes(run: Callable[[], None]) -> int:
    """The largest number of bytes allocated at once while ``run()`` runs, above what was allocated before it.

    Reads the profiler's ``[memory]`` events in time order (each carries the bytes allocated, negative when
    freed), through ``prof.profiler.kineto_results``: torch's profiler exposes the events' byte counts there only.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak
