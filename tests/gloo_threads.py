"""The threads gloo runs in this process. A process group torn down in full leaves none: one left running
while the interpreter exits can abort a run that ended well (see fastmae.train.distributed.join_process_group)."""

from pathlib import Path

GLOO_THREAD_NAMES = ("gloo_tcp_loop", "pt_gloo_runloop")  # the names gloo gives them (Linux)


def gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return sorted(name for name in names if name in GLOO_THREAD_NAMES)
