"""Kubernetes mode settings: cheap to import (no client library), so the CLI can decide."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# the Node address types dialled, in order (kept here: the CLI imports only this module)
DEFAULT_ADDRESS_TYPES = ("InternalIP", "ExternalIP")
SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class KubeError(Exception):
    """Kubernetes mode cannot start; the message says what to set."""


@dataclass
class KubeSettings:
    node_name: str
    kubeconfig: Path | None = None  # None: in-cluster (ServiceAccount)
    address_types: tuple[str, ...] = DEFAULT_ADDRESS_TYPES
    service_account: Path = SERVICE_ACCOUNT

    def where(self) -> str:
        return f"kubeconfig {self.kubeconfig}" if self.kubeconfig else "in-cluster"


def settings(*, no_kube: bool, kubeconfig: str | None, node_name: str | None,
             address_type: str | None) -> KubeSettings | None:
    """Kubernetes mode is on with --kubeconfig, or in a Pod (KUBERNETES_SERVICE_HOST)."""
    if no_kube or not (kubeconfig or os.environ.get("KUBERNETES_SERVICE_HOST")):
        return None
    node = node_name or os.environ.get("NODE_NAME")
    if not node:
        raise KubeError("Kubernetes mode needs this node's name: set NODE_NAME from the "
                        "downward API (fieldRef spec.nodeName) or give --node-name; or turn "
                        "Kubernetes mode off with --no-kube")
    types: tuple[str, ...] = DEFAULT_ADDRESS_TYPES
    if address_type:
        types = (address_type, *(t for t in DEFAULT_ADDRESS_TYPES if t != address_type))
    return KubeSettings(node, Path(kubeconfig) if kubeconfig else None, types)


