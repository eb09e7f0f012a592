"""The peer network that carries the allocation engine's payloads between daemons.

Daemons gossip over TCP (default port 6783).  The engine is sans-IO: it hands the mesh
plain msgpack-able dicts to ``send`` to one peer (relayed along shortest paths when not
directly connected) or to ``broadcast`` to direct neighbours, and receives them through
``on_message``.  Reachability changes arrive through ``on_peer_up``/``on_peer_down``.

Modules: ``frames`` (wire format, schema checks), ``handshake`` (peer acceptance rules),
``connection`` (one socket: reader/writer tasks, bounded send queue, the kernel's
keepalive), ``liveness`` (heartbeats and deadlines of every connection from one timer),
``topology`` (gossiped peer graph, routes), ``crypto`` (``password=``: an Argon2id
secret salted by ``cluster=``, an X25519 key exchange authenticated by it, then every
frame sealed with SecretBox and a per-direction counter nonce; ``second_password=`` is
also accepted from diallers while rotating), ``mesh`` (the ``Mesh`` itself).

With a password, peers without it (or with another one) are refused and both sides log
why; without one, encrypting peers are refused.  At most ``max_per_ip`` inbound
connections per remote address may be in the handshake at once.
"""

from .frames import PROTOCOL_VERSION, FrameError, MeshError
from .mesh import ConnInfo, Mesh, PeerInfo

__all__ = ["PROTOCOL_VERSION", "ConnInfo", "FrameError", "Mesh", "MeshError", "PeerInfo"]
