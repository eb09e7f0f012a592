"""Peer authentication and encryption (``--password``), on PyNaCl.

After the plaintext hellos, each side of an encrypting connection sends an ephemeral
X25519 public key (``kx`` frame, generated per connection) and then proves it knows the
shared secret with a keyed BLAKE2b MAC over the transcript (both hellos, both public
keys) and its role (``auth`` frame).  The dialler proves itself first; the listener
answers only a dialler it accepted, so a stranger who connects gets nothing to guess a
password against.

The shared secret is a 32-byte key derived from the password with Argon2id (memory-hard:
a recorded handshake cannot be brute-forced cheaply), salted with a fixed value per
cluster (a hash of the allocation range, so two clusters with one password still get
different keys).  It is derived once per process; the password itself is never kept.  A
``Keyring`` holds the current secret (proves us when we dial) and optionally a second one
(also accepted from a dialler), so a password can be rotated one daemon at a time.
Two directional session keys come from the X25519 result, the secret and the
transcript, so each connection has fresh keys (forward secrecy) and a captured frame
is useless on any other connection.

Every frame after that is ``4-byte length`` + ``8-byte counter`` + ``SecretBox`` output
(XSalsa20-Poly1305): the nonce is the per-direction counter, which starts at 0 and must
go up by exactly one each frame, so a replayed, dropped or reordered frame is refused.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from .frames import HEADER_LEN, FrameError, MeshError

KEY_LEN = 32
COUNTER_LEN = 8
# Sizes fixed by the algorithms (PyNaCl's SecretBox.MACBYTES, SecretBox.NONCE_SIZE and
# argon2id.SALTBYTES), written out so that importing this module costs no PyNaCl: it is
# imported only with --password (tests/test_imports.py checks them against PyNaCl).
MAC_LEN = 16
NONCE_LEN = 24
SALT_LEN = 16
SEAL_OVERHEAD = COUNTER_LEN + MAC_LEN  # per frame, on top of the body
_NONCE_PAD = bytes(NONCE_LEN - COUNTER_LEN)
_MAX_COUNTER = (1 << 64) - 1
# Argon2id cost: 2 passes over 24 MiB, about 0.04 CPU-seconds here (benchmarks/
# bench_crypto.py --kdf); the start-up budget is 0.1 s even with a second password.
KDF_OPSLIMIT = 2
KDF_MEMLIMIT = 24 << 20
MAX_PASSWORDS = 2  # the current one and, while rotating, one more accepted from peers
DIALLER = b"dialler"
LISTENER = b"listener"


class ReplayError(FrameError):
    """A sealed frame whose counter is not the next one expected."""


def cluster_salt(cluster: str) -> bytes:
    """The KDF salt for a cluster: public and fixed (every daemon must derive the same
    key), 16 bytes of BLAKE2b over the cluster's identity (the daemon's allocation range)."""
    return hashlib.blake2b(cluster.encode(), digest_size=SALT_LEN,
                           person=b"wipam-kdf-salt").digest()


def derive_secret(password: bytes, cluster: str = "") -> bytes:
    """The 32-byte shared secret for ``password`` in ``cluster`` (Argon2id)."""
    import nacl.pwhash.argon2id as argon2id

    if not isinstance(password, bytes) or not password:
        raise MeshError("the password must be a non-empty byte string")
    return argon2id.kdf(KEY_LEN, password, cluster_salt(cluster),
                        opslimit=KDF_OPSLIMIT, memlimit=KDF_MEMLIMIT)


class Keyring:
    """The derived secrets of one daemon: ``dial`` proves us when we dial; a dialler
    proving any of them is accepted (the current password and, while rotating, the
    other one).  Secrets stay out of repr."""

    def __init__(self, passwords: Sequence[bytes], cluster: str = "") -> None:
        if not 1 <= len(passwords) <= MAX_PASSWORDS:
            raise MeshError(f"give 1 to {MAX_PASSWORDS} passwords (the current one, then "
                            f"while rotating a second one), not {len(passwords)}")
        if len(set(passwords)) != len(passwords):
            raise MeshError("the second password is the same as the first: drop it")
        self.secrets = tuple(derive_secret(p, cluster) for p in passwords)

    @property
    def dial(self) -> bytes:
        return self.secrets[0]

    @property
    def rotating(self) -> bool:
        """Whether a second password is accepted too."""
        return len(self.secrets) > 1

    def __repr__(self) -> str:
        return f"<Keyring of {len(self.secrets)} secret(s)>"

    def match(self, transcript_hash: bytes, role: bytes, tag: bytes,
              dial_only: bool = False) -> bytes | None:
        """The secret ``tag`` proves (each checked in constant time), or None; with
        ``dial_only`` only the current one counts."""
        found = None
        for secret in self.secrets[:1] if dial_only else self.secrets:
            if check_tag(secret, transcript_hash, role, tag) and found is None:
                found = secret
        return found


def _blake(data: bytes, key: bytes, person: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=KEY_LEN, key=key, person=person).digest()


def transcript(dialler_hello: bytes, listener_hello: bytes, dialler_pub: bytes,
               listener_pub: bytes) -> bytes:
    """Hash of everything both sides said before authenticating (length-delimited)."""
    h = hashlib.blake2b(digest_size=KEY_LEN, person=b"wipam-transcript")
    for part in (dialler_hello, listener_hello, dialler_pub, listener_pub):
        h.update(len(part).to_bytes(4, "big"))
        h.update(part)
    return h.digest()


def auth_tag(secret: bytes, transcript_hash: bytes, role: bytes) -> bytes:
    """Proof that the sender of ``role`` knows ``secret``, bound to this transcript."""
    return _blake(transcript_hash + role, secret, b"wipam-auth")


def check_tag(secret: bytes, transcript_hash: bytes, role: bytes, tag: bytes) -> bool:
    return hmac.compare_digest(auth_tag(secret, transcript_hash, role), tag)


def session_keys(secret: bytes, shared: bytes, transcript_hash: bytes) -> tuple[bytes, bytes]:
    """(dialler-to-listener key, listener-to-dialler key)."""
    base = shared + transcript_hash
    return (_blake(base + DIALLER, secret, b"wipam-session"),
            _blake(base + LISTENER, secret, b"wipam-session"))


class KeyPair:
    """An ephemeral X25519 key pair, one per connection."""

    def __init__(self) -> None:
        import nacl.public

        self._private = nacl.public.PrivateKey.generate()
        self.public = bytes(self._private.public_key)

    def shared(self, peer_public: bytes) -> bytes:
        """The X25519 (+HSalsa20) shared key; FrameError for an unusable public key."""
        import nacl.exceptions
        import nacl.public

        try:
            box = nacl.public.Box(self._private, nacl.public.PublicKey(peer_public))
            return bytes(box.shared_key())
        except (nacl.exceptions.CryptoError, nacl.exceptions.TypeError,
                nacl.exceptions.ValueError) as exc:
            raise FrameError(f"kx.pub: unusable public key ({exc})") from None


def _nonce(counter: int) -> bytes:
    return _NONCE_PAD + counter.to_bytes(COUNTER_LEN, "big")


class Sealer:
    """Seals outgoing frames with a strictly increasing counter nonce."""

    def __init__(self, key: bytes) -> None:
        import nacl.secret

        self._box = nacl.secret.SecretBox(key)
        self._counter = 0

    def seal(self, frame: bytes) -> bytes:
        """``frame`` is an encoded plaintext frame (length prefix + body)."""
        counter = self._counter
        if counter > _MAX_COUNTER:
            raise MeshError("nonce counter exhausted")
        self._counter = counter + 1
        nonce = _nonce(counter)
        sealed = nonce[-COUNTER_LEN:] + self._box.encrypt(frame[HEADER_LEN:], nonce).ciphertext
        return len(sealed).to_bytes(HEADER_LEN, "big") + sealed


class Opener:
    """Opens incoming sealed frame bodies; refuses any counter but the next one."""

    def __init__(self, key: bytes) -> None:
        import nacl.exceptions
        import nacl.secret

        self._box = nacl.secret.SecretBox(key)
        self._refused = nacl.exceptions.CryptoError
        self._expected = 0

    def open(self, data: bytes) -> bytes:
        if len(data) <= SEAL_OVERHEAD:
            raise FrameError(f"sealed frame of {len(data)} bytes is too short")
        counter = int.from_bytes(data[:COUNTER_LEN], "big")
        if counter != self._expected:
            raise ReplayError(f"replayed or reordered frame: counter {counter}, "
                              f"expected {self._expected}")
        try:
            body = self._box.decrypt(data[COUNTER_LEN:], _nonce(counter))
        except self._refused:
            raise FrameError("frame failed decryption: tampered, corrupted or wrong key"
                             ) from None
        self._expected = counter + 1
        return body
