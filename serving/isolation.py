"""Failure isolation: run items as one batch, and when the batch fails, each item alone, so
only the items that fail get their exception. Used by the batch commands
(:func:`serving.cli.common.run_batch`) and the HTTP server's batcher
(:mod:`serving.server.batching`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def run_isolated(run: Callable[[list[T]], list[R]], items: Sequence[T],
                 on_retry: Callable[[Exception], None] | None = None) -> list[R | Exception]:
    """``run(items)`` as one batch; if it raises, ``run([item])`` for each item alone, so only
    the items that fail get their exception (in place of their result) and the others
    succeed.

    Args:
        run: maps a list of items to one result per item.
        on_retry: called with the batch's exception before the one-by-one retry.
    """
    items = list(items)
    try:
        return list(run(items))
    except Exception as exc:  # noqa: BLE001 - any failure: find the item that causes it
        if len(items) == 1:
            return [exc]
        if on_retry is not None:
            on_retry(exc)
    outcomes: list[R | Exception] = []
    for item in items:
        try:
            outcomes.extend(run([item]))
        except Exception as exc:  # noqa: BLE001 - reported per item
            outcomes.append(exc)
    return outcomes
