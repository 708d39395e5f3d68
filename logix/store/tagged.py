"""Tagged safetensors files: every file logix writes names its kind in the metadata
(`"format": "logix-..."`), and is opened through `read_tagged` (one check of the tag, one clear
error for damaged or foreign files). `tensors_checksum` is the content checksum that curvature
statistics and caches carry in their metadata and that is checked on load.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors import safe_open

from logix.errors import StoreError

CHECKSUM_KEY = "checksum"


def read_tagged(
    path: str | Path,
    formats: str | tuple[str, ...],
    what: str,
    fix: str = "",
    error: type[Exception] = StoreError,
    keys: list[str] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the safetensors file at `path`, whose metadata "format" must be
    one of `formats`; anything else raises `error` saying it is not `what`, with `fix`.
    `keys` reads only those tensors (default: all)."""
    path = Path(path)
    formats = (formats,) if isinstance(formats, str) else formats
    try:
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata() or {}
            if md.get("format") not in formats:
                raise error(
                    f"{path} is not {what} (its metadata names format "
                    f"{md.get('format')!r}, expected {' or '.join(formats)}){_tail(fix)}"
                )
            tensors = {k: f.get_tensor(k) for k in (f.keys() if keys is None else keys)}
    except FileNotFoundError:
        raise
    except error:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise error(f"{path} cannot be read as {what} ({e}){_tail(fix)}") from e
    return tensors, md


def _tail(fix: str) -> str:
    return f": {fix}" if fix else ""


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """A blake2b digest of every tensor's name, dtype, shape and bytes (order-independent)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def checksum_matches(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool | None:
    """True / False when `metadata` carries a checksum; None when it has none (older files)."""
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is None:
        return None
    return recorded == tensors_checksum(tensors)
