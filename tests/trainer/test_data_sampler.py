"""Modality-length grouped micro-batches: pure, sharded, deterministic per seed and epoch."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from llava_trainer.data.sampler import (
    MicroBatchSampler,
    micro_batches_per_rank,
    plan_micro_batches,
    shard_micro_batches,
)

RNG = np.random.default_rng(3)
N = 203
LENGTHS = RNG.integers(20, 2000, N)
IS_IMAGE = RNG.random(N) < 0.8
ALL = np.arange(N)


def plan(epoch=0, seed=1, indices=ALL, group=True, micro=4, mega=16):
    return plan_micro_batches(
        LENGTHS,
        IS_IMAGE,
        indices,
        micro_batch_size=micro,
        megabatch_size=mega,
        seed=seed,
        epoch=epoch,
        group_by_length=group,
    )


@pytest.mark.parametrize("group", [True, False])
def test_image_and_text_only_samples_never_share_a_micro_batch(group):
    for batch in plan(group=group):
        assert len({bool(IS_IMAGE[i]) for i in batch}) == 1


def test_every_sample_is_planned_exactly_once_per_epoch():
    flat = [i for batch in plan() for i in batch]
    assert sorted(flat) == list(range(N))


def test_micro_batches_hold_similar_lengths_within_a_megabatch():
    # Megabatches are sorted longest first, so consecutive micro-batches of a full megabatch descend.
    batches = plan()
    full = [b for b in batches[: len(batches) - 8]]  # the remnants sit at the end
    grouped_spread = np.mean([np.ptp(LENGTHS[b]) for b in full])
    random_spread = np.mean([np.ptp(LENGTHS[b]) for b in plan(group=False)[: len(full)]])
    assert grouped_spread < random_spread / 3
    first_mega = batches[:4]
    assert all(LENGTHS[a].min() >= LENGTHS[b].max() for a, b in itertools.pairwise(first_mega))


def test_deterministic_per_seed_and_epoch():
    assert plan(epoch=0) == plan(epoch=0)
    assert plan(epoch=0) != plan(epoch=1)
    assert plan(seed=1) != plan(seed=2)


def test_excluded_samples_are_never_planned():
    keep = ALL[ALL % 5 != 0]
    flat = {i for batch in plan(indices=keep) for i in batch}
    assert flat == set(keep.tolist())


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_ranks_get_disjoint_equal_shares_covering_the_epoch(world):
    batches = plan(mega=4 * world * 2)
    shards = [shard_micro_batches(batches, rank, world) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1
    assert len(shards[0]) == micro_batches_per_rank(
        IS_IMAGE, ALL, micro_batch_size=4, megabatch_size=8 * world, world_size=world
    )
    seen = [i for shard in shards for batch in shard for i in batch]
    assert set(seen) == set(range(N))
    padding = len(seen) - N  # a few repeated micro-batches keep ranks in lockstep
    assert 0 <= padding < world * 4


def test_ranks_stepping_together_get_similar_lengths():
    world = 4
    batches = plan(mega=4 * world)
    shards = [shard_micro_batches(batches, rank, world) for rank in range(world)]
    step0 = [LENGTHS[s[0]].max() for s in shards]
    assert max(step0) - min(step0) <= np.ptp(LENGTHS[np.concatenate(batches[:world])])


def test_sampler_length_matches_its_batches():
    sampler = MicroBatchSampler(
        LENGTHS,
        IS_IMAGE,
        ALL,
        micro_batch_size=4,
        megabatch_size=16,
        rank=1,
        world_size=2,
        seed=5,
        group_by_length=True,
    )
    assert len(sampler) == len(sampler.epoch_batches(0)) == len(sampler.epoch_batches(1))
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)


def test_megabatch_must_be_whole_micro_batches():
    with pytest.raises(ValueError, match="multiple"):
        plan(micro=3, mega=16)
