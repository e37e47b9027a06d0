"""KV-cache transfer from a prefill replica's cache into a decode replica's cache.

`KVTransport` (base.py) is the contract; `InProcessTransport` copies tensors inside one process.
The NIXL transport lives in `mixquant_serve.transfer.nixl` and is imported from there, so that
single-process use never loads NIXL/UCX.
"""

from mixquant_serve.transfer.base import (
    CacheLayout,
    KVTransferError,
    KVTransport,
    TransferStats,
)
from mixquant_serve.transfer.inprocess import InProcessHub, InProcessTransport

__all__ = [
    "CacheLayout",
    "InProcessHub",
    "InProcessTransport",
    "KVTransferError",
    "KVTransport",
    "TransferStats",
]
