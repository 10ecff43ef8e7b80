"""Compressed N:M weights: pack, unpack, save and load (the format is below).

A weight ``[rows, cols]`` that is already N:M along its last dim (at most N nonzeros in every
group of M consecutive columns) is stored as

* ``values`` ``[rows, cols * N / M]`` -- the kept values of each row in column order, in the
  weight's dtype (float32, bfloat16 or float16);
* ``mask`` ``[rows, ceil(cols / 8)]`` uint8 -- one bit per dense element, bit ``j`` of byte ``b``
  set when column ``8 * b + j`` is kept; bits past ``cols`` are zero.

Every group keeps exactly N positions (a group with fewer nonzeros also keeps its first zeros),
so the row length of ``values`` is fixed and the kernels can find any group without an index.
The bitmask costs 1/8 byte per weight whatever the pattern: the same as 2-bit indices for 2:4,
and it is what AVX-512 ``vexpandps`` and the AVX2 permutation table consume directly.

``pack`` then ``unpack`` is exact, bit for bit, for every kept value. Pruned positions come back
as ``+0.0`` (a ``-0.0`` at a pruned position is zero by value, and its sign is not stored).

On disk (``save_packed`` / ``load_packed``) a file is a safetensors file holding, per weight
``name``, the tensors ``name.values`` and ``name.mask``, plus header metadata
``{"format": "nmfx.packed", "version": "1", "layout": <json>}``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from nmfx.pattern import NMPattern, parse_pattern

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_DTYPES",
    "SUPPORTED_M",
    "PackedNM",
    "load_packed",
    "pack",
    "save_packed",
    "unpack",
]

logger = logging.getLogger(__name__)

FORMAT_NAME = "nmfx.packed"
FORMAT_VERSION = 1
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SUPPORTED_M = (4, 8, 16)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPES_BY_NAME = {v: k for k, v in _DTYPE_NAMES.items()}
# Elements of zeroed slack kept after the last value in the values' storage, so SIMD kernels
# may load a full vector at any row's last kept value (nm_ops.cpp: kValuePad). Not part of
# the format: never saved, never visible in ``values``.
VALUE_SLACK = 16
_BIT_WEIGHTS = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8)
_BITS = {2: torch.int16, 4: torch.int32}  # same-size integer views of the supported dtypes
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.uint8)


@dataclass(frozen=True, eq=False)
class PackedNM:
    """A weight ``[rows, cols]`` in compressed N:M form (see the module docstring).

    Build one with :func:`pack`; the fields are validated here so that a hand-made or
    loaded instance can be trusted by the kernels.
    """

    values: torch.Tensor
    mask: torch.Tensor
    shape: tuple[int, int]
    pattern: NMPattern

    def __post_init__(self) -> None:
        object.__setattr__(self, "pattern", parse_pattern(self.pattern))
        if len(self.shape) != 2:
            raise ValueError(f"PackedNM: shape must be (rows, cols), got {self.shape!r}")
        object.__setattr__(self, "shape", (int(self.shape[0]), int(self.shape[1])))
        rows, cols = self.shape
        n, m = self.pattern.n, self.pattern.m
        if self.values.dtype not in SUPPORTED_DTYPES:
            raise TypeError(_dtype_error(self.values.dtype))
        if m not in SUPPORTED_M or cols % m:
            raise ValueError(
                f"PackedNM: cols={cols} with pattern {self.pattern} is invalid: "
                f"M must be one of {SUPPORTED_M} and divide cols"
            )
        want_values = (rows, cols // m * n)
        want_mask = (rows, (cols + 7) // 8)
        if tuple(self.values.shape) != want_values:
            raise ValueError(
                f"PackedNM: values has shape {tuple(self.values.shape)}, expected {want_values} "
                f"for a [{rows}, {cols}] weight with pattern {self.pattern}"
            )
        if self.mask.dtype != torch.uint8 or tuple(self.mask.shape) != want_mask:
            raise ValueError(
                f"PackedNM: mask must be uint8 {want_mask}, got {self.mask.dtype} "
                f"{tuple(self.mask.shape)}"
            )
        if self.values.device.type != "cpu" or self.mask.device.type != "cpu":
            raise ValueError("PackedNM: values and mask must be CPU tensors; move them with .cpu()")
        # The kernels trust the mask to address the values: check it (cheap, bytewise).
        problem = check_mask(self.mask, cols, n, m)
        if problem:
            raise ValueError(f"PackedNM: corrupt mask: {problem}")
        object.__setattr__(self, "values", _with_slack(self.values))
        if not self.mask.is_contiguous():
            object.__setattr__(self, "mask", self.mask.contiguous())

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the packed representation (values + mask)."""
        return (
            self.values.numel() * self.values.element_size()
            + self.mask.numel() * self.mask.element_size()
        )

    @property
    def dense_nbytes(self) -> int:
        """Bytes the same weight takes dense."""
        return self.rows * self.cols * self.values.element_size()

    def dense(self) -> torch.Tensor:
        """The dense weight, a new tensor each call (nothing keeps it)."""
        return unpack(self)

    def __repr__(self) -> str:
        return (
            f"PackedNM(shape={self.shape}, pattern='{self.pattern}', dtype={self.dtype}, "
            f"nbytes={self.nbytes})"
        )


def _with_slack(v: torch.Tensor) -> torch.Tensor:
    """``v`` itself if contiguous with VALUE_SLACK spare elements in its storage, else a copy."""
    spare = v.untyped_storage().nbytes() // v.element_size() - v.storage_offset() - v.numel()
    if v.is_contiguous() and spare >= VALUE_SLACK:
        return v
    buf = torch.zeros(v.numel() + VALUE_SLACK, dtype=v.dtype)
    buf[: v.numel()].copy_(v.reshape(-1))
    return buf[: v.numel()].view(v.shape)


def _dtype_error(dtype: torch.dtype) -> str:
    names = ", ".join(_DTYPE_NAMES.values())
    return (
        f"dtype {dtype} is not supported by the packed N:M format; supported: {names}; "
        f"cast the weight first, e.g. w.float()"
    )


def _check_pattern(pattern: NMPattern, cols: int) -> None:
    if pattern.m not in SUPPORTED_M:
        raise ValueError(
            f"pattern {pattern}: M={pattern.m} is not supported by the packed format; "
            f"use M in {SUPPORTED_M}, e.g. '2:4' or '4:8'"
        )
    if cols % pattern.m:
        raise ValueError(
            f"cols={cols} is not a multiple of M={pattern.m} (pattern {pattern}); "
            f"pad the weight's columns to a multiple of {pattern.m} or keep the layer dense"
        )


def check_mask(mask: torch.Tensor, cols: int, n: int, m: int) -> str:
    """Why ``mask`` (uint8 ``[rows, ceil(cols / 8)]``) is not a valid N:M bitmask ('' if it is).

    The kernels trust a valid mask to address the values; every packed weight entering nmfx
    (``PackedNM``, a lowered module's ``load_state_dict`` or unpickling, ``load_packed``) is
    checked here. The check counts bits a 64-bit word at a time (a few passes over the mask,
    1/8 byte per weight); the slower per-group count runs only to describe a failure.
    """
    if _mask_words_ok(mask, cols, n, m):
        return ""
    return _mask_problem(mask, cols, n, m) or "it does not keep exactly N of every M"


def buffers_problem(
    values: torch.Tensor, mask: torch.Tensor, rows: int, cols: int, n: int, m: int
) -> str:
    """Why ``values``/``mask`` cannot be a packed ``[rows, cols]`` N:M weight ('' if they can).

    For packed tensors arriving outside :class:`PackedNM` (a lowered module's state_dict or
    pickle): the kernels address ``values`` through ``mask``, so both are checked first.
    """
    if not isinstance(values, torch.Tensor) or not isinstance(mask, torch.Tensor):
        return "values and mask must be tensors"
    want_values = (rows, cols // m * n)
    if tuple(values.shape) != want_values or values.dtype not in SUPPORTED_DTYPES:
        return (
            f"values is {values.dtype} {tuple(values.shape)}, expected {want_values} in one of "
            f"{', '.join(_DTYPE_NAMES.values())}"
        )
    want_mask = (rows, (cols + 7) // 8)
    if mask.dtype != torch.uint8 or tuple(mask.shape) != want_mask:
        return f"mask is {mask.dtype} {tuple(mask.shape)}, expected uint8 {want_mask}"
    if mask.device.type != "cpu" or values.device.type != "cpu":
        return "values and mask must be CPU tensors"
    problem = check_mask(mask, cols, n, m)
    return f"corrupt mask: {problem}" if problem else ""


# Per-word constants of the bit count: a word of group counts equals n * _ONES[m] iff every
# group of m bits (m in 4, 8, 16) has n set.
_ONES = {4: 0x1111111111111111, 8: 0x0101010101010101, 16: 0x0001000100010001}


def _mask_words_ok(mask: torch.Tensor, cols: int, n: int, m: int) -> bool:
    """SWAR popcount of every group of ``m`` bits == n, bits past ``cols`` zero."""
    if mask.numel() == 0:
        return True
    full = mask
    if cols % 8:  # only M = 4 with an odd number of nibbles: the last byte holds one group
        last = mask[:, -1]
        if bool((last >> 4).any()) or bool((_POPCOUNT[last.long()] != n).any()):
            return False
        full = mask[:, :-1]
        if full.numel() == 0:
            return True
    flat = full.contiguous().reshape(-1)
    pad = (-flat.numel()) % 8  # whole groups of the same mask fill the last word
    if pad:
        if flat.numel() < pad:
            return not _mask_problem(mask, cols, n, m)
        flat = torch.cat([flat, flat[:pad]])
    words = flat.view(torch.int64)
    want = n * _ONES[m]
    # Chunks of 256 KB keep the temporaries in cache (whole-mask temporaries page-fault).
    for w in words.split(_CHECK_CHUNK_WORDS):
        c = w - ((w >> 1) & 0x5555555555555555)
        c = (c & 0x3333333333333333) + ((c >> 2) & 0x3333333333333333)
        if m >= 8:
            c = (c + (c >> 4)) & 0x0F0F0F0F0F0F0F0F
        if m == 16:
            c = (c + (c >> 8)) & 0x00FF00FF00FF00FF
        if not bool((c == want).all()):
            return False
    return True


_CHECK_CHUNK_WORDS = 1 << 15


def _mask_problem(mask: torch.Tensor, cols: int, n: int, m: int) -> str:
    """Why ``mask`` is not a valid N:M bitmask for ``cols`` columns ('' when it is)."""
    rows = mask.shape[0]
    if cols % 8 and bool((mask[:, -1] >> (cols % 8)).any()):
        return f"bits set past cols={cols}"
    counts = _POPCOUNT[mask.long()] if m != 4 else None
    if m == 4:
        idx = mask.long()
        nibbles = torch.stack([_POPCOUNT[idx & 0xF], _POPCOUNT[idx >> 4]], dim=-1)
        counts = nibbles.reshape(rows, -1)[:, : cols // 4]
    elif m == 16:
        counts = counts.reshape(rows, -1, 2).sum(-1)
    if bool((counts != n).any()):
        return f"it does not keep exactly {n} of every {m}"
    return ""


def _mask_bits_to_bytes(keep: torch.Tensor) -> torch.Tensor:
    """bool [rows, cols] -> uint8 [rows, ceil(cols/8)], little-endian bits."""
    rows, cols = keep.shape
    pad = (-cols) % 8
    if pad:
        keep = torch.nn.functional.pad(keep, (0, pad))
    bits = keep.view(rows, -1, 8).to(torch.uint8) * _BIT_WEIGHTS
    return bits.sum(dim=-1, dtype=torch.uint8)


def _mask_bytes_to_bits(mask: torch.Tensor, cols: int) -> torch.Tensor:
    """uint8 [rows, ceil(cols/8)] -> bool [rows, cols].

    The bit weights are made here, not read from a module-level tensor: this runs in the
    op's backward, which AOTAutograd traces (``torch.compile(..., backend="aot_eager")``),
    and a real tensor captured there is a constant its fake tracing refuses.
    """
    bit_weights = torch.ones(8, dtype=torch.uint8, device=mask.device).bitwise_left_shift_(
        torch.arange(8, dtype=torch.uint8, device=mask.device)
    )
    bits = (mask.unsqueeze(-1) & bit_weights) != 0
    return bits.reshape(mask.shape[0], -1)[:, :cols]


def pack(w: torch.Tensor, pattern: str | tuple[int, int] | NMPattern = "2:4") -> PackedNM:
    """Compress a weight ``[rows, cols]`` that is already N:M along its last dim.

    Raises ``ValueError`` naming the first group (row, group index, nonzeros found) with more
    than N nonzeros, and ``TypeError`` for unsupported dtypes.
    """
    pat = parse_pattern(pattern)
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"pack expects a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(
            f"pack expects a 2-D weight [rows, cols], got shape {tuple(w.shape)}; "
            f"reshape conv weights to [out, k..., in] first (group along input channels)"
        )
    if w.dtype not in SUPPORTED_DTYPES:
        raise TypeError(_dtype_error(w.dtype))
    if 0 in w.shape:
        raise ValueError(
            f"pack: the weight is empty (shape {tuple(w.shape)}); packing needs rows > 0 and "
            f"cols > 0: keep an empty layer dense"
        )
    rows, cols = w.shape
    _check_pattern(pat, cols)
    n, m = pat.n, pat.m
    w = w.detach().to("cpu").contiguous()
    groups = w.view(rows, cols // m, m)
    nonzero = groups != 0  # NaN counts as nonzero, -0.0 as zero
    counts = nonzero.sum(dim=-1)
    bad = counts > n
    if bool(bad.any()):
        flat = int(bad.flatten().nonzero()[0])
        row, grp = divmod(flat, cols // m)
        raise ValueError(
            f"weight is not {pat}: row {row}, group {grp} (columns {grp * m}..{grp * m + m - 1}) "
            f"has {int(counts[row, grp])} nonzeros, at most N={n} allowed; prune it to {pat} "
            f"first (keep the N largest |w| of each group of {m}) or pick a denser pattern"
        )
    # Keep every nonzero, then the first zeros of the group, so each group keeps exactly N.
    position = torch.arange(m, dtype=torch.int16)
    score = nonzero.to(torch.int16) * m + (m - 1 - position)
    keep_idx = score.topk(n, dim=-1, sorted=False).indices.sort(dim=-1).values
    keep = torch.zeros_like(nonzero).scatter_(-1, keep_idx, True).view(rows, cols)
    # Gathered as integers: torch's bfloat16 gather rewrites NaN bits (0x7FC0 -> 0xFFFF).
    bits = _BITS[w.element_size()]
    values = groups.view(bits).gather(-1, keep_idx).view(w.dtype).reshape(rows, cols // m * n)
    return PackedNM(values=values, mask=_mask_bits_to_bytes(keep), shape=(rows, cols), pattern=pat)


def unpack(p: PackedNM) -> torch.Tensor:
    """The dense weight ``[rows, cols]`` of ``p`` (exact inverse of :func:`pack`)."""
    keep = _mask_bytes_to_bits(p.mask, p.cols)
    bits = _BITS[p.values.element_size()]  # as integers: bit for bit, NaN payloads included
    dense = torch.zeros(p.shape, dtype=bits)
    return dense.masked_scatter_(keep, p.values.view(bits)).view(p.dtype)


def unpack_buffers(
    values: torch.Tensor, mask: torch.Tensor, shape: tuple[int, int]
) -> torch.Tensor:
    """The dense weight of packed ``values``/``mask`` (what :func:`unpack` does, unchecked).

    nmfx keeps no dense copy of a packed weight: callers expand per use and drop the result.
    A mask keeping more values than ``values`` holds raises (torch checks the scatter).
    """
    rows, cols = shape
    keep = _mask_bytes_to_bits(mask, cols)
    bits = _BITS[values.element_size()]
    dense = torch.zeros((rows, cols), dtype=bits)
    return dense.masked_scatter_(keep, values.reshape(-1).view(bits)).view(values.dtype)


def save_packed(path: str | os.PathLike[str], tensors: dict[str, PackedNM]) -> None:
    """Write packed weights to a versioned safetensors file."""
    from safetensors.torch import save_file

    flat: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for name, p in tensors.items():
        if not isinstance(p, PackedNM):
            raise TypeError(f"save_packed: {name!r} is a {type(p).__name__}, expected PackedNM")
        layout[name] = {
            "rows": p.rows,
            "cols": p.cols,
            "n": p.pattern.n,
            "m": p.pattern.m,
            "dtype": _DTYPE_NAMES[p.dtype],
            "values": f"{name}.values",
            "mask": f"{name}.mask",
        }
        flat[f"{name}.values"] = p.values
        flat[f"{name}.mask"] = p.mask
    metadata = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "layout": json.dumps(layout)}
    save_file(flat, os.fspath(path), metadata=metadata)
    logger.info("saved %d packed weights to %s", len(tensors), path)


def _read_header(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise ValueError(
            f"{path}: not a readable safetensors file ({exc}); it is corrupt or truncated, "
            f"re-save it with nmfx.packed.save_packed"
        ) from exc


_LAYOUT_FIELDS = ("rows", "cols", "n", "m", "dtype", "values", "mask")


def _check_layout(path: str, layout: Any) -> None:
    """Each header entry names its fields and their allowed values (untrusted input)."""
    if not isinstance(layout, dict):
        raise ValueError(
            f"{path}: corrupt packed file: field 'layout' must map names to entries, got "
            f"{layout!r}; re-save it with nmfx.packed.save_packed"
        )
    for name, spec in layout.items():
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: entry {name!r} is corrupt: expected an object, got {spec!r}")
        missing = [f for f in _LAYOUT_FIELDS if f not in spec]
        if missing:
            raise ValueError(f"{path}: entry {name!r} is corrupt: missing field(s) {missing}")
        if not isinstance(spec["dtype"], str) or spec["dtype"] not in _DTYPES_BY_NAME:
            raise ValueError(
                f"{path}: entry {name!r} is corrupt: field 'dtype'={spec['dtype']!r} is not one of "
                f"{sorted(_DTYPES_BY_NAME)}"
            )


def load_packed(path: str | os.PathLike[str]) -> dict[str, PackedNM]:
    """Read a file written by :func:`save_packed`; checks format, version and integrity."""
    from safetensors.torch import load_file

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(
            f"{path} is a directory; pass the path of the file save_packed wrote, e.g. "
            f"{os.path.join(path, 'weights.safetensors')!r}"
        )
    meta = _read_header(path)
    if meta.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path}: not an nmfx packed file (metadata format={meta.get('format')!r}, "
            f"expected {FORMAT_NAME!r}); write it with nmfx.packed.save_packed"
        )
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise ValueError(f"{path}: bad format version {meta.get('version')!r}") from None
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: packed format version {version} is newer than this nmfx supports "
            f"(version {FORMAT_VERSION}); upgrade nmfx to read it"
        )
    if version < 1:
        raise ValueError(f"{path}: bad format version {version}")
    try:
        layout = json.loads(meta["layout"])
        flat = load_file(path)
    except Exception as exc:
        raise ValueError(
            f"{path}: corrupt or truncated packed file ({exc}); re-save it with save_packed"
        ) from exc
    _check_layout(path, layout)
    out: dict[str, PackedNM] = {}
    for name, spec in layout.items():
        try:
            dtype = _DTYPES_BY_NAME[spec["dtype"]]
            values, mask = flat[spec["values"]], flat[spec["mask"]]
            pattern = NMPattern(int(spec["n"]), int(spec["m"]))
            p = PackedNM(
                values=values,
                mask=mask,
                shape=(int(spec["rows"]), int(spec["cols"])),
                pattern=pattern,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path}: entry {name!r} is corrupt: {exc}") from exc
        if p.dtype != dtype:
            raise ValueError(f"{path}: entry {name!r} has dtype {p.dtype}, header says {dtype}")
        out[name] = p
    logger.info("loaded %d packed weights from %s (format v%d)", len(out), path, version)
    return out
