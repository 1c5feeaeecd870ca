"""Seeds of generated volumes: pinned values, so a change to how they are derived cannot pass silently
(every generated dataset and every resumed run depends on them)."""

from __future__ import annotations

import hashlib

from lad_fast.generate.jobs import augment_seed, derive_seed, volume_seed


def test_derive_seed_values_are_pinned():
    assert derive_seed("volume", 0, 0) == 6889909542200471093
    assert derive_seed("volume", 0, 3) == 9028050281289213670
    assert derive_seed("augment", 1, 2) == 1772477978207589052
    assert derive_seed() == 3797230976420062948


def test_derive_seed_is_what_its_docstring_says():
    digest = hashlib.blake2b(b"volume:7:0", digest_size=8).digest()
    expect = int.from_bytes(digest, "little") & (2**63 - 1)
    assert derive_seed("volume", 7, 0) == expect
    assert derive_seed("a", 1) == derive_seed("a:1") != derive_seed("a", 2)  # parts are joined with ':'


def test_volume_and_augment_seeds_are_pinned():
    assert volume_seed(7, 0) == 8729474954141928313 == derive_seed("volume", 7, 0)
    assert augment_seed(7, 0) == 392304197 == derive_seed("augment", 7, 0) & 0xFFFFFFFF
    assert augment_seed(1, 0) == 922197472
    assert all(0 <= volume_seed(s, i) < 2**63 for s in range(3) for i in range(50))


def test_draw_job_takes_source_i_mod_s_and_variant_i_div_s_mod_augment():
    import numpy as np
    import torch
    from _shared import small_config

    from lad_fast.generate.jobs import SourceMask, augmented_mask, draw_job

    cfg = small_config()
    masks = []
    for s in range(2):
        m = np.zeros((8, 16, 16), np.uint8)
        m[2:6, 4 + s : 10, 3:12] = 1  # liver
        m[3:5, 6:9, 6 + s : 9] = 5  # pancreas
        masks.append(SourceMask(f"case{s}", m, np.eye(4)))
    seen = []

    def encode(mask):
        seen.append(mask)
        return {"content": torch.zeros(1), "structure": torch.full((2,), float(len(seen)))}

    job = draw_job(5, masks, seed=3, augment=2, cfg=cfg, encode=encode)  # source 5 % 2, variant 5 // 2 % 2
    expect, record = augmented_mask(masks[1], 1, 0, 3, cfg)
    assert job.index == 5 and job.source is masks[1] and job.augmentation == record and record["index"] == 0
    np.testing.assert_array_equal(job.mask, expect)
    assert seen[0] is job.mask and job.structure.tolist() == [1.0, 1.0]  # conditions of the augmented mask
    plain = draw_job(2, masks, seed=3, augment=0, cfg=cfg, encode=encode)
    assert plain.source is masks[0] and plain.augmentation is None and plain.mask is masks[0].mask
