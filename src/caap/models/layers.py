"""Layer ranges over the residual stream: `layers.start` / `layers.stop` resolved against a model's depth.

The residual positions of a ViT with L blocks are 0..L: `r_0` = token embeddings, `r_j` = input
of block j (output of block j-1), `r_L` = output of the last block. A layer range is a Python slice over
`range(L + 1)`: `start` and `stop` may be negative (counting from the end, so -1 is position L) and
`stop=None` means "through L". CAAP (arXiv 2603.13652) patches the positions `range(start, stop)`.
"""

from __future__ import annotations


def resolve_layer_range(
    start: int, stop: int | None, depth: int, model_name: str = "model"
) -> tuple[int, int]:
    """Resolve `(start, stop)` to non-negative positions with `0 <= start < stop <= depth + 1`.

    Args:
        start: first residual position (`layers.start`); negatives count from the end (-1 = L).
        stop: one past the last position (`layers.stop`); None means through L (= `depth + 1`); negatives
            count from the end like a Python slice (`stop=-1` ends before L).
        depth: number of blocks L of the model.
        model_name: used in error messages.

    Returns:
        `(start, stop)` with the positions `range(start, stop)`, a non-empty subset of `range(depth + 1)`.

    Raises:
        ValueError: naming `layers.start` / `layers.stop`, the value given, the model, its depth and the
            allowed values, when a bound is out of range, not an integer, or the range is empty.
    """
    n = depth + 1  # positions 0..L
    allowed = f"allowed: {-n}..{n - 1} (positions 0..{depth}; negatives count from the end)"

    def _check_int(key: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(
                f"{key}={value!r} must be an integer for model '{model_name}' (depth L={depth}); {allowed}"
            )
        return value

    start = _check_int("layers.start", start)
    if not -n <= start < n:
        raise ValueError(
            f"layers.start={start} is out of range for model '{model_name}' with depth L={depth} "
            f"(residual positions 0..{depth}); {allowed}"
        )
    start_pos = start % n
    if stop is None:
        stop_pos = n
    else:
        stop = _check_int("layers.stop", stop)
        if not -n <= stop <= n:
            raise ValueError(
                f"layers.stop={stop} is out of range for model '{model_name}' with depth L={depth} "
                f"(residual positions 0..{depth}); allowed: {-n}..{n} or null (= through L={depth})"
            )
        stop_pos = stop + n if stop < 0 else stop
    if stop_pos <= start_pos:
        raise ValueError(
            f"empty layer range layers.start={start}, layers.stop={stop} for model '{model_name}' with depth "
            f"L={depth}: positions range({start_pos}, {stop_pos}) is empty; need start < stop over positions "
            f"0..{depth} (stop=null means through L={depth})"
        )
    return start_pos, stop_pos


def all_layer_ranges(depth: int) -> list[tuple[int, int]]:
    """Every valid CAAP layer range `(start, stop)` for a model with `depth` blocks, in sweep order.

    The positions are `0..depth`, so the ranges are all `0 <= start < stop <= depth + 1`:
    `(depth + 1) * (depth + 2) / 2` of them (28 for the 6-block FashionGrid ViT, 91 for ViT-B/16).
    This is the one generator of the layer sweep (`layers=all_pairs`) and of `layers=auto`'s landscape.

    Raises:
        ValueError: when `depth` is not a positive integer.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth={depth!r} must be a positive integer (the number of blocks L)")
    n = depth + 1
    return [(start, stop) for start in range(n) for stop in range(start + 1, n + 1)]
