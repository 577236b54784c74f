"""The key format."""

from __future__ import annotations

import math

from shared import keys


def test_generated_keys_are_well_formed_and_distinct() -> None:
    made = {keys.generate() for _ in range(1000)}
    assert len(made) == 1000
    for key in made:
        assert key.startswith("bl-")
        assert len(key) == keys.KEY_LEN
        assert keys.is_well_formed(key)


def test_randomness_is_at_least_128_bits() -> None:
    assert 32 * math.log2(62) >= 128


def test_any_single_character_change_is_caught() -> None:
    key = keys.generate()
    for i in range(3, len(key)):
        for replacement in "0aZ":
            if key[i] != replacement:
                assert not keys.is_well_formed(key[:i] + replacement + key[i + 1 :])


def test_malformed_shapes_are_refused() -> None:
    key = keys.generate()
    for bad in ("", "bl-", key[:-1], key + "x", "sk-" + key[3:], key.replace(key[5], "!", 1)):
        assert not keys.is_well_formed(bad)


def test_hash_and_display_prefix() -> None:
    key = keys.generate()
    assert keys.hash_key(key) == keys.hash_key(key)
    assert len(keys.hash_key(key)) == 64
    assert keys.display_prefix(key) == key[:9]
