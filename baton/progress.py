"""Progress bars for the stages' long loops (training steps, embedding a split).

On a terminal only: `disable=None` makes tqdm turn itself off when stderr is not a TTY (a Slurm
log, a pipe, a CI job), where the stage's log lines already report progress and a bar's carriage
returns would fill the file with thousands of half-lines.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


def progress_bar(total: int | None, desc: str, initial: int = 0, enabled: bool = True, unit: str = "step") -> tqdm:
    """A bar to `update(n)`; `enabled=False` (a rank other than 0) never shows one; `total=None`
    counts without a total (a stream of unknown length)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                disable=None if enabled else True)


@contextmanager
def logs_above_bar(logger) -> Iterator[None]:
    """Log lines printed above the bar instead of through it."""
    with logging_redirect_tqdm(loggers=[logger]):
        yield
