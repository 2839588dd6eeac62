"""Serving constraints of the quantization method: fused projections share a level; a kernel's bit grid.

fuse  vLLM loads q/k/v of a block as one fused linear (`qkv_proj`) and gate/up as one (`gate_up_proj`), each
      with ONE quantization scheme: a checkpoint whose q_proj and k_proj differ in bits is refused ("Found a
      different quantization schemes for ['q_proj', 'k_proj', 'v_proj'] ... vLLM requires all to use the same
      scheme", vllm-project/vllm#47473). With `fuse: true` each such group of a block is one unit, named like
      vLLM's fused module (`block.3.self_attn.qkv_proj`); its members are the per-linear units of the level
      database (each linear is still GPTQ'd on its own: the database does not change) and all take the unit's
      level. o_proj and down_proj stay single units. A fused unit's size is the sum of its members', the same in
      every block, so `group` (the unit's size) keeps level switches budget-exact.
kernel the bit widths (and group sizes) a named kernel runs: the search's levels are the database's bits that the
      kernel runs, e.g. `marlin` -> 4 and 8 (vLLM's Marlin kernels for integer weights with zero points).

Levels need not be contiguous: any evenly spaced grid (2,3,4 or 4,8 or 2,4,6,8) keeps every level step of a
unit at the same cost, so a level switch (one unit a step up, one of the same group a step down) stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from evopress.errors import require

# vLLM's fused module -> the checkpoint modules it is loaded from (its `packed_modules_mapping` for Llama-like
# models). A group is fused only when all its members exist under one parent module.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class Kernel:
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]  # 0 = one group per row (compressed-tensors' "channel", vLLM's -1)


# From vLLM's docs: compressed-tensors WNA16 with zero points runs uint4 and uint8 (4 and 8 bits); Marlin's group
# sizes are -1 (channel), 32, 64, 128 (MARLIN_SUPPORTED_GROUP_SIZES). See README "Serving constraints".
KERNELS = {"marlin": Kernel(bits=(4, 8), group_sizes=(0, 32, 64, 128))}


def grid_step(bits: tuple[int, ...]) -> int:
    """The bits between neighbouring levels (1 for a single level); one-line error unless evenly spaced."""
    steps = {b - a for a, b in zip(bits, bits[1:], strict=False)}
    require(
        len(steps) <= 1 and all(s > 0 for s in steps),
        f"bits={list(bits)} must be ascending and evenly spaced (every level step the same number of bits, "
        f"so a level switch keeps the budget exact), e.g. 2,3,4,5,6 or 4,8",
    )
    return steps.pop() if steps else 1


def check_kernel(kernel: str, group_size: int) -> Kernel | None:
    """The named kernel (None for "": any bits); one-line error for an unknown name or a group size it lacks."""
    if not kernel:
        return None
    require(kernel in KERNELS, f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)} (or none)")
    spec = KERNELS[kernel]
    require(
        group_size in spec.group_sizes,
        f"group_size={group_size} is not run by kernel {kernel!r}; it runs group sizes "
        f"{list(spec.group_sizes)} (0 = one group per row)",
    )
    return spec


def kernel_levels(bits: tuple[int, ...], kernel: str, group_size: int) -> tuple[int, ...]:
    """The levels the search uses: the database's bits that `kernel` runs (all of them without a kernel)."""
    spec = check_kernel(kernel, group_size)
    levels = bits if spec is None else tuple(b for b in bits if b in spec.bits)
    require(
        bool(levels),
        f"kernel {kernel!r} runs bits {list(spec.bits) if spec else []}, the database has bits {list(bits)}: "
        f"none of them; build one with bits: {list(spec.bits) if spec else []}",
    )
    grid_step(levels)
    return levels


def fused_units(linears: list[str]) -> dict[str, list[str]]:
    """unit -> its member linear units, in forward order, q/k/v and gate/up of a block fused (see FUSED).

    `linears` are per-linear unit names `block.<i>.<module path>`; a fused unit takes the place of its first
    member and is named `<parent>.<fused name>` (block.3.self_attn.qkv_proj).
    """
    present = set(linears)
    units: dict[str, list[str]] = {}
    taken: set[str] = set()
    for unit in linears:
        if unit in taken:
            continue
        parent, _, leaf = unit.rpartition(".")
        group = next(
            (
                (fused, [f"{parent}.{m}" for m in members])
                for fused, members in FUSED.items()
                if leaf in members and all(f"{parent}.{m}" in present for m in members)
            ),
            None,
        )
        if group is None:
            units[unit] = [unit]
        else:
            units[f"{parent}.{group[0]}"] = group[1]
            taken.update(group[1])
    return units


def fused_conflicts(bits_of: dict[str, int]) -> list[str]:
    """Fused modules (e.g. model.layers.3.self_attn.qkv_proj) whose parts have different bits: what vLLM refuses.

    `bits_of` maps module names of linears (any naming with the leaf last) to their bits."""
    fused = fused_units(list(bits_of))
    return [name for name, members in fused.items() if len({bits_of[m] for m in members}) > 1]
