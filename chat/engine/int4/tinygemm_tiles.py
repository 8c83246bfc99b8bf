"""Reading tinygemm's int4 tiles back, so a prompt's products can run as one dense product.

tinygemm (`_weight_int4pack_mm`) is built for a few rows: on Falcon-180B's shape a 1,900-token
prompt took 22.6 s (docs/performance.md). For a prompt, dequantizing each weight to bf16 once and
calling cuBLAS costs about one pass over the weights plus the product's arithmetic instead.

`_convert_weight_to_int4pack` scatters each tile of 8 rows x 16*tiles columns over 32 lanes of
int32 words in the order its tensor-core kernel reads them; the order is not documented, so it is
found by packing probes (each column's position, written in base 16, one digit per probe) and
reading where each position landed. `TileOrder.check` compares the result with the weight it was
packed from: a layout that is not tile-local, or changes in another torch, turns the prompt path
off (the decode path never uses it) instead of giving wrong numbers.
"""

from __future__ import annotations

import logging

import torch

try:  # Triton comes with CUDA builds of torch; the CPU path needs none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

log = logging.getLogger(__name__)


def _tinygemm_pack(swapped: torch.Tensor, tiles: int) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack(swapped, tiles)


def swap_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """uint8 levels [out, in] -> the bytes tinygemm packs: the even column in the high nibble."""
    return (levels[:, 0::2] << 4 | levels[:, 1::2]).to(torch.uint8)


def nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> uint8 [..., W * 8]: each word's eight nibbles, lowest first."""
    return torch.stack([((words >> (4 * j)) & 15).to(torch.uint8) for j in range(8)], dim=-1).flatten(-2)


class TileOrder:
    """Where tinygemm puts each position of a tile (see the module docstring)."""

    def __init__(self, tiles: int, device, pack=_tinygemm_pack):
        self.tiles = tiles
        columns = 16 * tiles
        positions = torch.arange(8 * columns, device=device).view(8, columns)
        found = torch.zeros(8 * columns, dtype=torch.long, device=device)
        for digit in range(3):  # 8 * 16 * 8 = 1,024 positions at most: three base-16 digits
            probe = ((positions >> (4 * digit)) & 15).to(torch.uint8)
            found |= nibbles(pack(swap_nibbles(probe), tiles).reshape(-1)).long() << (4 * digit)
        self.position_of_slot = found

    def levels(self, tiled: torch.Tensor) -> torch.Tensor:
        """The uint8 levels [out, in] held in `tiled` ([out/8, in/(16*tiles), 32, tiles/2] int32)."""
        row_tiles, column_tiles = tiled.shape[0], tiled.shape[1]
        slots = nibbles(tiled.reshape(row_tiles, column_tiles, -1))
        levels = torch.empty_like(slots)
        levels[..., self.position_of_slot] = slots
        columns = 16 * self.tiles
        return levels.view(row_tiles, column_tiles, 8, columns).transpose(1, 2).reshape(8 * row_tiles, -1)

    def check(self, tiled: torch.Tensor, levels: torch.Tensor) -> bool:
        return bool(torch.equal(self.levels(tiled), levels))

    def table(self, device) -> torch.Tensor:
        """position_of_slot as int32 on `device`, for the Triton kernel (kept once per device)."""
        key = str(device)
        tables = self.__dict__.setdefault("_tables", {})
        if key not in tables:
            tables[key] = self.position_of_slot.to(device=device, dtype=torch.int32)
        return tables[key]


_ORDERS: dict[tuple[int, str], TileOrder | None] = {}


def order_for(tiles: int, tiled: torch.Tensor, levels: torch.Tensor, pack=_tinygemm_pack) -> TileOrder | None:
    """The tile order for `tiles` on this device, checked once against a real weight; None if
    the probe does not reproduce it (the prompt products then stay on tinygemm)."""
    key = (tiles, str(tiled.device))
    if key not in _ORDERS:
        order = TileOrder(tiles, tiled.device, pack)
        if not order.check(tiled, levels):
            log.warning("int4: tinygemm's tile layout was not recovered; prompts use tinygemm (slow)")
            order = None
        _ORDERS[key] = order
    return _ORDERS[key]


def dense_weight(tiled, scale_zero, order: TileOrder, dtype, kernel: bool | None = None) -> torch.Tensor:
    """The weight [out, in] in `dtype`: (q - 8) * scale + zero, as tinygemm computes it.

    On a GPU one Triton pass (`kernel`; on 180B the torch path below took ~4.4 s a prompt).
    """
    if kernel is None:
        kernel = triton is not None and tiled.is_cuda
    if kernel:
        return _dense_by_triton(tiled, scale_zero, order, dtype)
    q = order.levels(tiled)
    out_features, in_features = q.shape
    groups = scale_zero.shape[0]
    scale = scale_zero[..., 0].t().to(dtype)[..., None]  # [out, groups, 1]
    zero = scale_zero[..., 1].t().to(dtype)[..., None]
    w = (q.view(out_features, groups, -1).to(dtype) - 8) * scale + zero
    return w.view(out_features, in_features)


def _dense_by_triton(tiled, scale_zero, order: TileOrder, dtype) -> torch.Tensor:
    row_tiles, column_tiles = tiled.shape[0], tiled.shape[1]
    columns = 16 * order.tiles
    out_features, in_features = 8 * row_tiles, columns * column_tiles
    groups = scale_zero.shape[0]
    dense = torch.empty(out_features, in_features, dtype=dtype, device=tiled.device)
    _tiles_to_dense[(row_tiles, column_tiles)](
        tiled.contiguous(),
        order.table(tiled.device),
        scale_zero.contiguous(),
        dense,
        out_features,
        in_features,
        GROUP=in_features // groups,
        COLUMNS=columns,
        SLOTS=8 * columns,
        num_warps=4,
    )
    return dense


if triton is not None:

    @triton.jit
    def _tiles_to_dense(
        tiled_ptr,
        table_ptr,
        sz_ptr,
        out_ptr,
        N,
        K,
        GROUP: tl.constexpr,
        COLUMNS: tl.constexpr,
        SLOTS: tl.constexpr,
    ):
        # One tile (8 rows x COLUMNS columns): each nibble slot to the position the table gives.
        row_tile = tl.program_id(0)
        column_tile = tl.program_id(1)
        slot = tl.arange(0, SLOTS)
        tile = row_tile.to(tl.int64) * tl.num_programs(1) + column_tile
        word = tl.load(tiled_ptr + tile * (SLOTS // 8) + slot // 8)
        q = ((word >> (4 * (slot % 8))) & 15).to(tl.float32)
        position = tl.load(table_ptr + slot)
        row = row_tile * 8 + position // COLUMNS
        column = column_tile * COLUMNS + position % COLUMNS
        at = ((column // GROUP).to(tl.int64) * N + row) * 2  # scale_zero [groups, out, 2]
        scale = tl.load(sz_ptr + at).to(tl.float32)
        zero = tl.load(sz_ptr + at + 1).to(tl.float32)
        tl.store(
            out_ptr + row.to(tl.int64) * K + column, ((q - 8.0) * scale + zero).to(out_ptr.dtype.element_ty)
        )
