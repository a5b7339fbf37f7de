"""How the ws tiles cut a call into thread blocks (csrc/quick_tail_split.cuh): whole tiles, then
the last wave's tiles split along K. The header is compiled on the host; its plan and its
block -> work map (the kernel's own function) are checked here without a GPU: every (tile, K
stage) is computed exactly once, partial slots and counters are distinct, and the cost model
splits where a wave is mostly empty and not where the partials would cost more."""

from __future__ import annotations

import pytest
from _host_probe import run_host_probe

SMS = 132  # H100 SXM: one ws block per SM

# name, tiles, tile tokens, tile columns, K, max splits, forced splits (0: the estimate)
CASES = [
    ("13824x5120 M=1024 ws256", 40 * 4, 256, 128, 13824, 8, 0),
    ("13824x5120 M=512 ws256", 40 * 2, 256, 128, 13824, 8, 0),
    ("4096x12288 M=256 ws256", 96, 256, 128, 4096, 8, 0),
    ("4096x12288 M=4096 ws256", 96 * 16, 256, 128, 4096, 8, 0),
    ("4096x4096 M=512 ws256", 32 * 2, 256, 128, 4096, 8, 0),
    ("whole waves", 2 * SMS, 256, 128, 13824, 8, 0),
    ("max splits 1", 40 * 4, 256, 128, 13824, 1, 0),
    ("forced 3, dp + tail", 40 * 4, 256, 128, 13824, 8, 3),
    ("forced 5, all tail", 40, 128, 128, 4096, 8, 5),
    ("forced 7, uneven K", 150, 256, 128, 4096 + 64 * 3, 8, 7),
    ("forced 32, short K", 140, 256, 128, 256, 8, 32),
]


def probe_source() -> str:
    calls = "\n".join(
        f'  run("{name}", {tiles}, {tokens}, {cols}, {k}, {max_splits}, {forced});'
        for name, tiles, tokens, cols, k, max_splits, forced in CASES)
    return r"""
#include <cstdio>
#include "quick_tail_split.cuh"
using namespace quick;
// grid_n 8 column blocks of 2 tiles (any grid works: the map only numbers tiles)
void run(const char* name, int tiles, int tokens, int cols, int k, int max_splits, int forced) {
  const int stages = k / 64, grid_n = 8, wgs = 2;
  const TailSplit t = plan_tail_split(tiles, @SMS@, tokens, cols, k, stages, max_splits, forced);
  std::printf("case %s|%d %d %d %d %d\n", name, t.splits, t.stages_per_split, t.dp_blocks, t.tail_tiles, t.blocks);
  for (int b = 0; b < t.blocks; ++b) {
    const WsBlockWork w = ws_block_work(b, t.dp_blocks, t.splits, t.stages_per_split, stages, grid_n, wgs, tokens);
    std::printf("b %d %d %d %d %d %d %d %d\n", w.tile_n0, w.row0, w.split, w.splits, w.tail, w.stage_begin,
                w.stage_count, stages);
  }
}
int main() {
@CALLS@
  return 0;
}
""".replace("@SMS@", str(SMS)).replace("@CALLS@", calls)


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    out = run_host_probe(probe_source(), tmp_path_factory.mktemp("tail_split"))
    result, blocks = {}, None
    for line in out.splitlines():
        if line.startswith("case "):
            name, fields = line[5:].split("|")
            splits, per_split, dp, tail, n_blocks = map(int, fields.split())
            blocks = []
            result[name] = {"splits": splits, "stages_per_split": per_split, "dp_blocks": dp, "tail_tiles": tail,
                            "blocks": n_blocks, "work": blocks}
        else:
            blocks.append(tuple(map(int, line.split()[1:])))
    return result


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_every_tile_stage_computed_once(plans, case):
    name, tiles, tokens, _, k, _, _ = case
    plan = plans[name]
    assert len(plan["work"]) == plan["blocks"] == plan["dp_blocks"] + plan["tail_tiles"] * plan["splits"]
    assert plan["dp_blocks"] + plan["tail_tiles"] == tiles
    stages = k // 64
    covered = {}
    slots = set()
    for tile_n0, row0, split, splits, tail, begin, count, total in plan["work"]:
        assert total == stages and count >= 1 and 0 <= begin and begin + count <= stages
        tile = row0 // tokens * 8 + tile_n0 // 2
        assert 0 <= tile < tiles and tile_n0 % 2 == 0 and row0 % tokens == 0
        if tail < 0:
            assert splits == 1 and split == 0 and begin == 0 and count == stages and tile < plan["dp_blocks"]
        else:
            assert splits == plan["splits"] > 1 and 0 <= split < splits and tile == plan["dp_blocks"] + tail
            assert 0 <= tail < plan["tail_tiles"]
            slot = tail * splits + split
            assert slot not in slots
            slots.add(slot)
        for s in range(begin, begin + count):
            assert (tile, s) not in covered, (name, tile, s)
            covered[(tile, s)] = True
    assert len(covered) == tiles * stages


def test_cost_model_choices(plans):
    # 160 tiles on 132 SMs: the second wave's 28 tiles in quarters (not a second whole wave)
    p = plans["13824x5120 M=1024 ws256"]
    assert (p["splits"], p["dp_blocks"], p["tail_tiles"]) == (4, 132, 28)
    # 80 tiles, one wave 61% full: three K ranges each (2 waves of thirds), no whole tiles
    p = plans["13824x5120 M=512 ws256"]
    assert (p["splits"], p["dp_blocks"], p["tail_tiles"]) == (3, 0, 80)
    # 96 tiles of K = 4096: the partials would cost more than the idle SMs
    assert plans["4096x12288 M=256 ws256"]["splits"] == 1
    # 11.6 waves: the last 84 tiles' waves are worth less than their partials (97% filled anyway)
    assert plans["4096x12288 M=4096 ws256"]["splits"] == 1
    assert plans["whole waves"]["splits"] == 1 and plans["whole waves"]["blocks"] == 2 * SMS
    assert plans["max splits 1"]["splits"] == 1
    assert plans["4096x4096 M=512 ws256"]["splits"] == 2


def test_forced_splits(plans):
    assert (plans["forced 3, dp + tail"]["splits"], plans["forced 3, dp + tail"]["dp_blocks"]) == (3, 132)
    assert (plans["forced 5, all tail"]["splits"], plans["forced 5, all tail"]["dp_blocks"]) == (5, 0)
    # 67 stages in 7 ranges of 10: the last range is 7 stages
    assert plans["forced 7, uneven K"]["stages_per_split"] == 10
    # K = 4 stages: at most 2 ranges
    assert plans["forced 32, short K"]["splits"] == 2
