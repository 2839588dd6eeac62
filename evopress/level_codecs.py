"""How a level file stores its tensors: as they are ("plain"), or in the smallest exact form ("compact").

A level database holds every level of every unit, so its size is (levels x model size): the authors' databases
take 100-200 GB for a 7-8B model. Most of that is redundant: a 3-bit GPTQ code sits in a whole byte, and a
60%-sparse weight stores its zeros. The compact encoding keeps each tensor in the smallest of these exact forms
(decoding gives back the same tensor bit for bit, so fitness, search and stitch are unchanged):

  <name>          the tensor as is (plain; also whatever no other form makes smaller)
  <name>.planes   a uint8 tensor of small integers as bit planes: uint8 [bits, ceil(n / 8)], plane k holding
                  bit k of every value, 8 values per byte, least significant first; `bits` is what the largest
                  value needs (3 planes for 3-bit GPTQ codes: 3/8 of a byte per weight)
  <name>.bitmask  a floating tensor with many zeros as a bitmask (uint8 [1, ceil(n / 8)], the same one-plane
  <name>.values   layout) and its non-zero values in row-major order, in the tensor's dtype

Bit planes rather than a packed bit stream: decoding is one table lookup per plane and byte (0.5-0.8 ms per plane
for the default model's largest linear on two CPU cores), where unpacking a stream of 3- or 5-bit fields bit by
bit is 10-20x slower; the size is the same.

Shapes are not stored in the files: the database's manifest records every tensor's shape.
"""

from __future__ import annotations

import sys

import torch

from evopress.errors import require

ENCODINGS = ("plain", "compact")
# byte -> its 8 bits spread over the 8 bytes of an int64 (bit i in the i-th byte in memory): one gather per plane
# decodes 8 values at once, and `<< k` moves every bit to position k of its byte without crossing into the next
_BYTE_OF_BIT = range(8) if sys.byteorder == "little" else range(7, -1, -1)
_SPREAD = sum(((torch.arange(256) >> i) & 1) << (8 * b) for i, b in enumerate(_BYTE_OF_BIT))
_WEIGHTS = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)

Tensors = dict[str, torch.Tensor]


def check_encoding(encoding: str) -> str:
    require(encoding in ENCODINGS, f"database encoding {encoding!r}; allowed: {', '.join(ENCODINGS)}")
    return encoding


# --- bit planes ----------------------------------------------------------------------------------------------
def pack_planes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 values (< 2^bits, any shape) -> uint8 [bits, ceil(numel / 8)]: plane k = bit k, LSB-first bytes."""
    flat = values.reshape(-1)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).view(-1, 8)
    planes = [(((flat >> k) & 1) * _WEIGHTS).sum(1, dtype=torch.uint8) for k in range(bits)]
    return torch.stack(planes) if planes else flat.new_zeros(0, flat.shape[0])


def unpack_planes(planes: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """Inverse of `pack_planes`: uint8 values of `shape`."""
    n = 1
    for d in shape:
        n *= int(d)
    out = torch.zeros(planes.shape[1], dtype=torch.int64)
    for k in range(planes.shape[0]):
        out |= _SPREAD[planes[k].long()] << k
    return out.view(torch.uint8)[:n].view(*shape)


# --- one tensor ----------------------------------------------------------------------------------------------
def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def encode_tensor(name: str, t: torch.Tensor) -> Tensors:
    """The smallest exact stored form of one tensor, under the names the module docstring lists."""
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.uint8 and t.numel():
        bits = max(int(t.max()).bit_length(), 1)
        if bits < 8:
            return {f"{name}.planes": pack_planes(t, bits)}
    if t.is_floating_point() and t.numel():
        mask = t != 0
        values = t[mask]
        if (t.numel() + 7) // 8 + _nbytes(values) < _nbytes(t):
            return {f"{name}.bitmask": pack_planes(mask.to(torch.uint8), 1), f"{name}.values": values}
    return {name: t}


def decode_tensor(stored: Tensors, name: str, shape: list[int]) -> torch.Tensor:
    """The tensor `name` of `shape` back from its stored form (one-line error if the file lacks it)."""
    if name in stored:
        return stored[name]
    if f"{name}.planes" in stored:
        return unpack_planes(stored[f"{name}.planes"], shape)
    require(
        f"{name}.bitmask" in stored and f"{name}.values" in stored,
        f"level file has no tensor {name!r} in any known form (has {sorted(stored)})",
    )
    mask = unpack_planes(stored[f"{name}.bitmask"], shape).bool()
    values = stored[f"{name}.values"]
    require(
        int(mask.sum()) == values.numel(), f"{name}: bitmask sets {int(mask.sum())}, {values.numel()} stored"
    )
    return torch.zeros(list(shape), dtype=values.dtype).masked_scatter_(mask, values)


# --- one level file ------------------------------------------------------------------------------------------
def encode(tensors: Tensors, encoding: str) -> Tensors:
    if encoding == "plain":
        return tensors
    stored: Tensors = {}
    for name, t in tensors.items():
        stored.update(encode_tensor(name, t))
    return stored


def decode(stored: Tensors, shapes: dict[str, list[int]]) -> Tensors:
    """A level's tensors back from a file of either encoding (plain files decode to themselves)."""
    return {name: decode_tensor(stored, name, shape) for name, shape in shapes.items()}


def nbytes(tensors: Tensors) -> int:
    return sum(_nbytes(t) for t in tensors.values())
