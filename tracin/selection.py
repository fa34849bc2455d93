"""Parse selections of examples such as ``7``, ``0:100`` or ``3,10:20,42``."""

from __future__ import annotations

import numpy as np

from tracin.errors import SelectionError


def parse_selection(text: str, size: int, what: str = "test") -> np.ndarray:
    """Return the dataset indices that ``text`` selects from a split of ``size`` examples.

    ``text`` is a comma-separated list of indices and half-open ranges ``start:stop``
    (as in Python slices; ``:stop`` and ``start:`` work), or ``all``. Order is kept and
    duplicates are removed.

    Raises:
        SelectionError: the selection is empty, malformed or out of range.
    """
    text = text.strip()
    if text == "all":
        if size == 0:
            raise SelectionError(f"the {what} split is empty, so 'all' selects nothing.")
        return np.arange(size, dtype=np.int64)
    indices: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        if not part:
            continue
        try:
            if ":" in part:
                start_text, stop_text = part.split(":", 1)
                start = int(start_text) if start_text else 0
                stop = int(stop_text) if stop_text else size
                if start >= stop:
                    raise SelectionError(
                        f"range {part!r} selects nothing, because its start {start} is not below its stop {stop}; "
                        f"use start:stop with 0 <= start < stop <= {size}."
                    )
                if start < 0 or stop > size:
                    raise SelectionError(
                        f"range {part!r} is out of range for the {what} split of {size} examples; "
                        f"use start:stop with 0 <= start < stop <= {size}."
                    )
                indices.extend(range(start, stop))
            else:
                index = int(part)
                if not 0 <= index < size:
                    raise SelectionError(
                        f"index {index} is out of range for the {what} split of {size} examples; "
                        f"valid indices are 0 to {size - 1}."
                    )
                indices.append(index)
        except ValueError:
            raise SelectionError(
                f"{what} selection {text!r} is malformed at {part!r}; use indices and ranges such as 3,10:20."
            ) from None
    if not indices:
        raise SelectionError(f"{what} selection {text!r} is empty; pass indices such as 0:10.")
    return np.array(list(dict.fromkeys(indices)), dtype=np.int64)


def check_indices(indices, size: int, what: str = "test") -> np.ndarray:
    """Validate indices passed from Python and return them as an int64 array."""
    array = np.asarray(indices, dtype=np.int64).reshape(-1)
    if array.size == 0:
        raise SelectionError(f"the {what} selection is empty; pass at least one index.")
    bad = array[(array < 0) | (array >= size)]
    if bad.size:
        raise SelectionError(
            f"{what} indices {bad[:10].tolist()} are out of range for a split of {size} examples; "
            f"valid indices are 0 to {size - 1}."
        )
    return array
