"""Synthetic key-value retrieval data in the lost-in-the-middle format, reproducibly seeded."""

import random
import uuid

from .errors import UserError


def _uuid4(rng: random.Random) -> str:
    # uuid.uuid4() reads os.urandom; drawing the bits from ``rng`` makes the data reproducible.
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def generate_kv_records(num_examples: int, num_keys: int, seed: int) -> list[dict]:
    """``num_examples`` records ``{"ordered_kv_records", "key", "value"}`` of ``num_keys`` pairs.

    Keys are unique within a record; the queried pair's index is uniform over 0..num_keys-1.
    The same arguments always give identical records.
    """
    if num_examples < 0:
        raise UserError(f"--num_examples must be at least 0, got {num_examples}")
    if num_keys < 1:
        raise UserError(f"--num_keys must be at least 1, got {num_keys}")
    rng = random.Random(seed)
    records = []
    for _ in range(num_examples):
        keys: list[str] = []
        seen: set[str] = set()
        while len(keys) < num_keys:
            key = _uuid4(rng)
            if key not in seen:
                seen.add(key)
                keys.append(key)
        pairs = [[key, _uuid4(rng)] for key in keys]
        gold = rng.randrange(num_keys)
        records.append({"ordered_kv_records": pairs, "key": pairs[gold][0], "value": pairs[gold][1]})
    return records
