"""Packed training: K configurations that share their computation's shape trained at once as one vectorized model
(the engine) with a real torch optimizer and schedule per member (optim). How a study fills a pack is the study's
(searchlab.study.pack_trials)."""

from searchlab.packing.engine import (
    MemberBatches,
    PackedTraining,
    can_pack,
    pack_mismatch,
    shared_key,
    varies_per_member,
)

__all__ = ["MemberBatches", "PackedTraining", "can_pack", "pack_mismatch", "shared_key", "varies_per_member"]
