"""MultiProc's worker server: started early, it imports while the command builds its workflow.

Nipype's MultiProc runs nodes in workers forked from a ``forkserver``
(``fork`` hangs once the parent has run torch).  The server imports the
interfaces (torch, scipy, matplotlib) once; every worker forked from it
starts with them loaded.  Started before the command's own imports, that
import runs on another core at the same time instead of after them.
"""

from __future__ import annotations

import multiprocessing
from multiprocessing import forkserver

#: Modules the server imports once for all the workers it forks.
PRELOAD = ["nipype_inrlddmm.interfaces"]


def start_worker_server() -> None:
    """Start the forkserver (preloading :data:`PRELOAD`) unless it runs already; returns without waiting."""
    multiprocessing.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()
