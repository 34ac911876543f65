"""Kafka's default key partitioner (the Java client's murmur2), stdlib only.

Shared by the producer SDK (which groups events by partition before batching them into one
message) and the embedded bus (which must place keys exactly where Kafka would, so that
predictions and labels of one request meet in the same stage-1 partition).
"""

from __future__ import annotations

__all__ = ["murmur2", "murmur2_partition"]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (the Java client's default partitioner) as a signed 32-bit int.

    Test vectors are those of Kafka's ``Utils.murmur2`` (as used in Akka's Murmur2Spec):

    >>> [murmur2(s.encode()) for s in ("1", "12", "123", "1234", "12345")]
    [-1993445489, 126087238, -267702483, -1614185708, -1188365604]
    """
    length = len(data)
    m = 0x5BD1E995
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    n4 = length // 4
    for i in range(n4):
        i4 = i * 4
        k = data[i4] | (data[i4 + 1] << 8) | (data[i4 + 2] << 16) | (data[i4 + 3] << 24)
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = (h * m) & 0xFFFFFFFF
        h ^= k
    extra = length % 4
    idx = n4 * 4
    if extra >= 3:
        h ^= data[idx + 2] << 16
    if extra >= 2:
        h ^= data[idx + 1] << 8
    if extra >= 1:
        h ^= data[idx]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and ``partitioner=murmur2_random``) picks."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
