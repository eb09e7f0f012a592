"""One peer's IPAM as a pure state machine (see `peer`); the layers are described in `base`."""

from .base import (
    ANTI_ENTROPY,
    AUTO_PRIME_AFTER,
    GOSSIP_FANOUT,
    GOSSIP_INTERVAL,
    OP_TIMEOUT,
    SYNC_GRACE,
    TAKEOVER_WAIT,
)
from .interface import (
    Allocate,
    Claim,
    Event,
    Fail,
    InitMode,
    Leave,
    Lookup,
    Output,
    Persist,
    Prime,
    Release,
    Reply,
    Request,
    RmPeer,
    Send,
)
from .peer import Allocator

__all__ = [
    "ANTI_ENTROPY", "AUTO_PRIME_AFTER", "GOSSIP_FANOUT", "GOSSIP_INTERVAL", "OP_TIMEOUT",
    "SYNC_GRACE", "TAKEOVER_WAIT", "Allocate", "Allocator", "Claim", "Event", "Fail",
    "InitMode", "Leave", "Lookup", "Output", "Persist", "Prime", "Release", "Reply", "Request",
    "RmPeer", "Send",
]
