"""Shared key-map machinery: rename state-dict keys through a table of module prefixes."""

from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from sumie.errors import CheckpointError

# (module prefix in the source layout, module prefix in the target layout, renames of the next key segment;
# None = keep the rest of the key as is)
Entry = tuple[str, str, dict[str, str] | None]


def count_indices(sd: Mapping[str, Tensor], pattern: str) -> int:
    """1 + the largest integer matched by ``pattern``'s first group among the keys, or 0."""
    rx = re.compile(pattern)
    found = [int(m.group(1)) for k in sd if (m := rx.match(k))]
    return max(found) + 1 if found else 0


def unmapped_error(bad: list[str], what: str, hint: str = "") -> CheckpointError:
    """One error line naming up to 8 keys that no rule maps."""
    shown = ", ".join(bad[:8]) + (f" (and {len(bad) - 8} more)" if len(bad) > 8 else "")
    return CheckpointError(f"cannot map {len(bad)} {what} key(s): {shown}{hint}")


def _rename(rest: str, renames: dict[str, str] | None) -> str | None:
    """Apply the first matching leading-segment rename to ``rest`` (None: no rename applies)."""
    if not renames:
        return rest
    for old, new in renames.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def rename_keys(sd: Mapping[str, Tensor], entries: list[Entry], what: str, reverse: bool = False,
                hint: str = "") -> dict[str, Tensor]:
    """Rename every key by its longest module prefix among ``entries`` (target -> source if ``reverse``).

    The tensors are the same objects (no copy). Unmapped keys, or two keys landing on one, are a CheckpointError.
    """
    if reverse:
        table = {dst: (src, None if r is None else {v: k for k, v in r.items()}) for src, dst, r in entries}
    else:
        table = {src: (dst, r) for src, dst, r in entries}
    out: dict[str, Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        for n in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:n]))
            if hit is not None:
                rest = _rename(".".join(parts[n:]), hit[1])
                new = None if rest is None else f"{hit[0]}.{rest}"
                break
        if new is None:
            bad.append(key)
        else:
            out[new] = value
    if bad:
        raise unmapped_error(bad, what, hint)
    if len(out) != len(sd):
        raise CheckpointError(f"{what} state dict maps two keys onto one (mixed old and new names?)")
    return out
