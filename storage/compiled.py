"""``kernel``: how the storage package compiles its per-key loops (numba).

Machine code is cached under ``__pycache__`` beside the source (elsewhere if that is
read-only: see numba's ``NUMBA_CACHE_DIR``), so only a fresh checkout pays the compile.
Loading it still costs numba ~0.2 s a process the first time a kernel runs, so every
module that defines kernels runs each once on import: the cost lands at start-up, not
in a trainer's first batch or a service's first request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numba

_F = TypeVar("_F", bound=Callable[..., Any])


def kernel(fn: _F) -> _F:
    """Compile ``fn`` with numba (nopython, cached; runs without the GIL, so callers
    serialise access to the arrays it writes)."""
    return cast(_F, numba.njit(cache=True, nogil=True)(fn))
