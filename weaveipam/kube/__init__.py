"""Kubernetes mode: peers, consensus count and reclaim from the API server."""
