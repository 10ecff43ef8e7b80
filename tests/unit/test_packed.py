"""Packed N:M format: exact round trips, validation errors, and the versioned file format."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from nmfx.packed import (
    FORMAT_VERSION,
    PackedNM,
    _mask_problem,
    check_mask,
    load_packed,
    pack,
    save_packed,
    unpack,
)
from nmfx.pattern import NMPattern

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PATTERNS = ["2:4", "1:4", "3:4", "4:8", "1:8", "2:16", "5:16"]


def random_nm(rows: int, cols: int, n: int, m: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols // m, m, generator=g)
    idx = w.abs().topk(n, dim=-1).indices
    return torch.zeros_like(w).scatter_(-1, idx, w.gather(-1, idx)).reshape(rows, cols).to(dtype)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_round_trip_is_bitwise_exact(pattern: str, dtype: torch.dtype) -> None:
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(n * 100 + m)
    for trial in range(4):
        rows = int(torch.randint(1, 24, (1,), generator=g)) * 2 + 1  # odd row counts
        cols = m * int(torch.randint(1, 11, (1,), generator=g))  # often not a multiple of 8/16
        w = random_nm(rows, cols, n, m, dtype, seed=trial)
        p = pack(w, pattern)
        assert p.values.shape == (rows, cols // m * n)
        assert p.mask.shape == (rows, (cols + 7) // 8)
        assert p.values.dtype == dtype
        w2 = unpack(p)
        assert w2.dtype == dtype and w2.shape == w.shape
        assert torch.equal(bits(w2), bits(w))


def test_groups_with_fewer_nonzeros_keep_exactly_n() -> None:
    w = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0, 0.0]])
    p = pack(w, "2:4")
    assert p.values.shape == (1, 4)
    assert torch.equal(unpack(p), w)
    # mask: first two zeros of group 0 (bits 0, 1), then column 5 and the first zero (4)
    assert p.mask.tolist() == [[0b00110011]]


def test_nan_and_inf_survive_round_trip() -> None:
    w = torch.tensor([[float("nan"), 0.0, float("-inf"), 0.0]])
    assert torch.equal(bits(unpack(pack(w, "2:4"))), bits(w))


def test_padding_bits_are_zero_and_never_leak() -> None:
    w = random_nm(3, 12, 2, 4, torch.float32)  # 12 columns: last mask byte half used
    p = pack(w, "2:4")
    assert int((p.mask[:, -1] >> 4).sum()) == 0
    assert unpack(p).shape == (3, 12)


def test_nbytes_matches_design_ratios() -> None:
    rows, cols = 64, 4096
    for pattern, dtype, per_weight in [
        ("2:4", torch.float32, 2.125),
        ("2:4", torch.bfloat16, 1.125),
        ("1:4", torch.float32, 1.125),
        ("1:8", torch.float32, 0.625),
    ]:
        n, m = (int(v) for v in pattern.split(":"))
        p = pack(random_nm(rows, cols, n, m, dtype), pattern)
        assert p.nbytes == rows * cols * per_weight
        assert p.dense_nbytes == rows * cols * torch.empty(0, dtype=dtype).element_size()


def test_not_nm_names_first_bad_group() -> None:
    w = random_nm(4, 16, 2, 4, torch.float32)
    w[2, 8:11] = 1.0  # row 2, group 2 (columns 8..11) now has 3 or 4 nonzeros
    w[3, :] = 1.0
    with pytest.raises(ValueError, match=r"row 2, group 2 \(columns 8\.\.11\) has [34] nonzeros"):
        pack(w, "2:4")


@pytest.mark.parametrize(
    ("w", "pattern", "exc", "match"),
    [
        (torch.zeros(4, 10), "2:4", ValueError, r"cols=10 is not a multiple of M=4"),
        (torch.zeros(4, 12), "1:3", ValueError, r"M=3 is not supported"),
        (torch.zeros(2, 3, 4), "2:4", ValueError, r"2-D weight"),
        (torch.zeros(4, 8, dtype=torch.float64), "2:4", TypeError, r"float64 is not supported"),
        (torch.zeros(4, 8, dtype=torch.int32), "2:4", TypeError, r"int32 is not supported"),
        (torch.zeros(4, 8), "4:4", ValueError, r"0 < N < M"),
    ],
    ids=["cols-not-multiple", "bad-m", "3d", "fp64", "int", "bad-pattern"],
)
def test_pack_errors(w: torch.Tensor, pattern: str, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        pack(w, pattern)


def test_packed_validates_hand_made_fields() -> None:
    with pytest.raises(ValueError, match=r"values has shape"):
        PackedNM(torch.zeros(2, 3), torch.zeros(2, 1, dtype=torch.uint8), (2, 8), NMPattern(2, 4))


def test_save_load_round_trip(tmp_path) -> None:
    tensors = {
        "enc.fc1": pack(random_nm(5, 24, 2, 4, torch.float32), "2:4"),
        "enc.fc2": pack(random_nm(3, 32, 1, 8, torch.bfloat16), "1:8"),
        "head": pack(random_nm(7, 16, 3, 16, torch.float16), "3:16"),
    }
    path = tmp_path / "w.safetensors"
    save_packed(path, tensors)
    loaded = load_packed(path)
    assert set(loaded) == set(tensors)
    for name, p in tensors.items():
        q = loaded[name]
        assert q.shape == p.shape and q.pattern == p.pattern and q.dtype == p.dtype
        assert torch.equal(bits(unpack(q)), bits(unpack(p)))


def _rewrite_header(path, edit) -> None:
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    edit(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + size :])


def test_newer_version_is_rejected(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_packed(path, {"a": pack(random_nm(2, 8, 2, 4, torch.float32), "2:4")})

    def bump(header: dict) -> None:
        header["__metadata__"]["version"] = str(FORMAT_VERSION + 1)

    _rewrite_header(path, bump)
    with pytest.raises(ValueError, match=r"version 2 is newer .* upgrade nmfx"):
        load_packed(path)


def test_truncated_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "w.safetensors"
    save_packed(path, {"a": pack(random_nm(16, 64, 2, 4, torch.float32), "2:4")})
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        load_packed(path)
    path.write_bytes(raw[:20])
    with pytest.raises(ValueError, match=r"corrupt or truncated"):
        load_packed(path)


def test_corrupt_mask_is_rejected(tmp_path) -> None:
    from safetensors.torch import save_file

    p = pack(random_nm(2, 8, 2, 4, torch.float32), "2:4")
    with pytest.raises(ValueError, match=r"does not keep exactly 2 of every 4"):
        PackedNM(p.values, torch.full_like(p.mask, 0xFF), p.shape, p.pattern)
    path = tmp_path / "w.safetensors"
    save_packed(path, {"a": p})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(
        {"a.values": p.values.clone(), "a.mask": torch.full_like(p.mask, 0xFF)},
        str(path),
        metadata=meta,
    )
    with pytest.raises(ValueError, match=r"entry 'a' is corrupt: .*exactly 2 of every 4"):
        load_packed(path)


@pytest.mark.parametrize(("pattern", "cols"), [("2:4", 12), ("1:8", 16), ("3:16", 32)])
def test_mask_validation_catches_bad_groups_and_padding(pattern: str, cols: int) -> None:
    n, m = (int(v) for v in pattern.split(":"))
    p = pack(random_nm(3, cols, n, m, torch.float32), pattern)
    bad = p.mask.clone()
    bad[1, : max(1, m // 8)] |= (1 << min(m, 8)) - 1  # first group of row 1: all M kept
    with pytest.raises(ValueError, match=r"corrupt mask"):
        PackedNM(p.values, bad, p.shape, p.pattern)
    if cols % 8:
        pad = p.mask.clone()
        pad[0, -1] |= 0x80
        with pytest.raises(ValueError, match=r"past cols"):
            PackedNM(p.values, pad, p.shape, p.pattern)


def test_foreign_safetensors_file_is_rejected(tmp_path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match=r"not an nmfx packed file"):
        load_packed(path)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "3:4", "4:8", "1:8", "7:8", "2:16", "12:16"])
def test_word_mask_check_agrees_with_group_count(pattern: str) -> None:
    """The 64-bit-word bit count (check_mask) and the per-group count agree on valid masks and
    on masks with one flipped bit, for odd sizes (not whole words, half-used last bytes)."""
    n, m = (int(v) for v in pattern.split(":"))
    g = torch.Generator().manual_seed(m * 31 + n)
    for trial in range(40):
        rows = int(torch.randint(1, 6, (1,), generator=g))
        cols = m * int(torch.randint(1, 19, (1,), generator=g))
        mask = pack(random_nm(rows, cols, n, m, torch.float32, seed=trial), pattern).mask.clone()
        assert check_mask(mask, cols, n, m) == ""
        i = int(torch.randint(0, mask.numel(), (1,), generator=g))
        mask.view(-1)[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        assert check_mask(mask, cols, n, m) == _mask_problem(mask, cols, n, m)
        assert check_mask(mask, cols, n, m) != ""


def _lowered(pattern: str = "2:4", dtype: torch.dtype = torch.float32):
    from nmfx.lowering.cpu import NMLinear

    n, m = (int(v) for v in pattern.split(":"))
    w = random_nm(24, 64, n, m, dtype, seed=3)
    return torch.nn.Sequential(NMLinear(pack(w, pattern), torch.randn(24, dtype=dtype)))


def _one_extra_bit(mask: torch.Tensor) -> torch.Tensor:
    byte = int(mask[5, 3])
    mask[5, 3] = byte | (~byte & (byte + 1) & 0xFF)  # one group of row 5 keeps 3 of 4
    return mask


@pytest.mark.parametrize(
    ("key", "edit", "match"),
    [
        ("0.mask", lambda t: t.fill_(255), r"0: the packed 2:4 weight \[24, 64\] is invalid: "
         r"corrupt mask: it does not keep exactly 2 of every 4; the checkpoint is damaged"),
        ("0.mask", _one_extra_bit, r"corrupt mask"),
        ("0.mask", lambda t: t[:, :4], r"mask is torch.uint8 \(24, 4\), expected uint8 \(24, 8\)"),
        ("0.values", lambda t: t[:, :8], r"values is torch.float32 \(24, 8\), expected \(24, 32\)"),
    ],
    ids=["all-bits", "one-extra-bit", "mask-shape", "values-shape"],
)
def test_lowered_load_state_dict_rejects_corrupt_packed_weights(key, edit, match) -> None:
    """A checkpoint is untrusted: a bad mask is reported by load_state_dict and the layer keeps
    its buffers (the kernels would otherwise address the values through it)."""
    low = _lowered()
    before = {k: v.clone() for k, v in low.state_dict().items()}
    sd = {k: v.clone() for k, v in low.state_dict().items()}
    sd[key] = edit(sd[key]).clone()
    with pytest.raises(RuntimeError, match=match):
        low.load_state_dict(sd)
    for k, v in low.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_lowered_module_with_corrupt_mask_is_rejected_on_unpickling(tmp_path) -> None:
    import copy

    low = _lowered()
    torch.save(low, tmp_path / "ok.pt")
    assert isinstance(torch.load(tmp_path / "ok.pt", weights_only=False), torch.nn.Sequential)
    low[0].mask[0, 0] = 0xFF  # edited in place after lowering
    torch.save(low, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"invalid: corrupt mask"):
        torch.load(tmp_path / "bad.pt", weights_only=False)
    with pytest.raises(ValueError, match=r"invalid: corrupt mask"):
        copy.deepcopy(low)


def test_lowered_load_state_dict_accepts_a_valid_other_weight() -> None:
    low, other = _lowered(), _lowered("2:4")
    other[0].values.mul_(2)
    low.load_state_dict(other.state_dict())
    assert torch.equal(low[0].values, other[0].values)


def test_lowered_model_saves_with_safetensors_save_model(tmp_path) -> None:
    """Issue: save_model failed ("None is covering the entire storage") on the slack view of
    values; a lowered layer's values own their storage now."""
    from safetensors.torch import load_model, save_model

    low, other = _lowered(), _lowered()
    other[0].values.zero_()
    save_model(low, str(tmp_path / "low.safetensors"))
    load_model(other, str(tmp_path / "low.safetensors"))
    x = torch.randn(3, 64)
    torch.testing.assert_close(other(x), low(x))
