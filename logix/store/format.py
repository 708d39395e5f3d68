"""The on-disk contract of a gradient store: file names, the module table, atomic JSON.

A store is a directory (DESIGN §2):

    RUN_DIR/
      manifest.json                      format version, resolved config, module table, D, dtype
      projections.safetensors            P_in / P_out per module (written by the capture stage)
      index/rank-00000.json              one shard table per writing rank, replaced atomically
      shards/<segment>/r00000-000000.safetensors   rows [n, D] + data ids (JSON in the metadata)
      curvature/<segment>/…safetensors   curvature statistics per segment

`manifest.json` is written once when the store is created; every rank owns its own index file,
so several processes write one store without coordination and the reader merges the indexes.
This module knows nothing of torch modules: it deals in names, shapes and JSON only.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from logix.errors import StoreError
from logix.store.paths import inside

FORMAT_NAME = "logix-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROJECTIONS = "projections.safetensors"
INDEX_DIR = "index"
SHARD_DIR = "shards"
CURVATURE_DIR = "curvature"
_SEGMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass(frozen=True)
class ModuleInfo:
    """One row of the module table: where a watched module's block sits in a row of width D.

    The block is the projected gradient G̃ flattened row-major as [r_out, r_in]; with a bias the
    bias is the last input column (d_in counts the appended 1).
    """

    name: str
    type: str
    d_in: int
    d_out: int
    r_in: int
    r_out: int
    bias: bool
    offset: int

    @property
    def width(self) -> int:
        return self.r_in * self.r_out

    @property
    def columns(self) -> slice:
        return slice(self.offset, self.offset + self.width)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModuleInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def total_width(modules: list[ModuleInfo]) -> int:
    """D, the width of one stored row."""
    return sum(m.width for m in modules)


def check_module_table(modules: list[ModuleInfo], where: str = "the module table") -> None:
    """Offsets must tile [0, D) in order; names must be unique; sizes positive integers."""
    offset = 0
    seen = set()
    for m in modules:
        sizes = (m.d_in, m.d_out, m.r_in, m.r_out, m.offset)
        if not isinstance(m.name, str) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in sizes
        ):
            raise StoreError(f"{where}: module entry {m!r} is damaged (name or sizes)")
        if m.name in seen:
            raise StoreError(f"{where}: module {m.name!r} appears twice in the module table")
        seen.add(m.name)
        if m.offset != offset:
            raise StoreError(
                f"{where}: module {m.name!r} starts at column {m.offset}, "
                f"expected {offset}: the module table is damaged"
            )
        offset += m.width


def check_segment_name(name: str) -> str:
    if not isinstance(name, str) or not _SEGMENT_NAME.match(name):
        raise ValueError(
            f"segment name {name!r} is not valid: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Replace `path` as one step: `write(tmp)` fills a temporary file beside it, which is
    fsynced and renamed over `path`; on failure the temporary file is removed. Readers see the
    old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.unlink(missing_ok=True)  # a leftover (or a planted link) of this name is not ours
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as JSON, atomically (see `write_atomic`)."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=1) + "\n", encoding="utf-8"))


def parse_json(text: str | bytes, where: str) -> Any:
    """JSON read from a store: any parse failure (also nesting too deep for the parser, a
    RecursionError) is a StoreError naming `where`."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        kind = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise StoreError(f"{where} cannot be read as JSON ({kind}); the file is damaged") from None


def read_json(path: Path) -> Any:
    """The JSON in `path` (FileNotFoundError when missing; a StoreError naming it otherwise)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise StoreError(f"{path} cannot be read as JSON ({e}); the file is damaged") from e
    return parse_json(text, str(path))


def read_tagged_json(path: Path, tag: str, version: int, what: str, fix: str = "") -> dict:
    """The JSON object in `path`, checked to carry `"format": tag` and `"version": version`; a
    StoreError naming the file, `what` it should be and the `fix` (appended) otherwise."""
    obj = read_json(path)
    suffix = f"; {fix}" if fix else ""
    if not isinstance(obj, dict) or obj.get("format") != tag:
        raise StoreError(f"{path} is not a logix {what}{suffix}")
    if obj.get("version") != version:
        raise StoreError(
            f"{path} has {what} format version {obj.get('version')!r}; this logix reads version "
            f"{version}{suffix}"
        )
    return obj


def index_path(run_dir: Path, rank: int) -> Path:
    """Rank `rank`'s index file, checked (`paths.inside`: no link on the way)."""
    return inside(run_dir, INDEX_DIR, f"rank-{rank:05d}.json")


def shard_relpath(segment: str, rank: int, seq: int) -> str:
    return f"{SHARD_DIR}/{segment}/r{rank:05d}-{seq:06d}.safetensors"


def shard_file(run_dir: Path, rel: str) -> Path:
    """The shard file `rel` (an index entry's "file") of the store at `run_dir`, checked."""
    return inside(run_dir, rel)


def curvature_dir(run_dir: Path, segment: str) -> Path:
    """Where one segment's curvature files live, checked (`paths.inside`: no link on the way;
    its files go through `paths.checked_file`)."""
    return inside(run_dir, CURVATURE_DIR, segment)


SHARD_FORMAT = "logix-shard"
# storage dtype name -> (safetensors dtype code, bytes per element)
SAFETENSORS_DTYPES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    """Parse a safetensors header without reading the tensor data.

    Returns (header, data_start): the JSON header (tensor name -> {dtype, shape, data_offsets},
    plus "__metadata__") and the file offset where the data region begins. Offsets in the header
    are relative to data_start. Layout: 8-byte little-endian header length, JSON header, data.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise StoreError(f"{path} is not a safetensors file: {len(head)} bytes long")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > MAX_HEADER_BYTES:
            raise StoreError(f"{path} is not a safetensors file: header length {n} is invalid")
        raw = f.read(n)
    if len(raw) < n:
        raise StoreError(f"{path} is truncated inside its header ({len(raw)} of {n} bytes)")
    header = parse_json(raw, f"the safetensors header of {path}")
    if not isinstance(header, dict):
        raise StoreError(f"{path} has a damaged safetensors header (not a JSON object)")
    return header, 8 + n


def shard_layout(path: Path, width: int, dtype: str) -> tuple[int, int, dict[str, str]]:
    """Check a shard's header against the store and return (rows, data_offset, metadata).

    data_offset is the absolute file offset of row 0 of the `rows` tensor [rows, width].
    """
    header, data_start = read_safetensors_header(path)
    meta = header.get("__metadata__") or {}
    entry = header.get("rows")
    if not isinstance(meta, dict) or meta.get("format") != SHARD_FORMAT or not isinstance(entry, dict):
        raise StoreError(f"{path} is not a logix shard (no `rows` tensor / format metadata)")
    extra = sorted(set(header) - {"rows", "__metadata__"})
    if extra:
        raise StoreError(
            f"{path} holds tensors {extra[:5]} besides `rows`: a logix shard holds one tensor, "
            "so the file was changed outside logix"
        )
    code, itemsize = SAFETENSORS_DTYPES[dtype]
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if entry.get("dtype") != code or not _ints(shape, 2) or not _ints(offsets, 2):
        raise StoreError(
            f"{path} holds {entry.get('dtype')} rows of shape {shape}, but the store's "
            f"manifest says {code} rows of width {width}"
        )
    begin, end = offsets
    if shape[1] != width or begin != 0 or end != shape[0] * width * itemsize:
        raise StoreError(
            f"{path} holds rows of shape {shape} in bytes [{begin}, {end}) of its data; the "
            f"store's width is {width}: the header is damaged"
        )
    return shape[0], data_start, meta


def _ints(value: Any, n: int) -> bool:
    """`value` is a list of `n` non-negative ints below 2**63 (sizes a header may hold)."""
    return (
        isinstance(value, list)
        and len(value) == n
        and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63 for v in value)
    )


def file_crc32(path: Path, buf: bytearray | None = None) -> str:
    """crc32 of a file's bytes as 8 hex digits, read in blocks (into `buf` when given)."""
    buf = buf if buf is not None else bytearray(1 << 22)
    view = memoryview(buf)
    crc = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc & 0xFFFFFFFF:08x}"
