"""The daemon's CNI service: what the `weave-ipam` plugin binary (cni-shim/) forwards to."""

from .config import CniError
from .http import EXIT_HEADER, add_cni_routes
from .service import CniService

__all__ = ["EXIT_HEADER", "CniError", "CniService", "add_cni_routes"]
