"""Request metadata that lets a proxy route every stream of a session to the same replica."""

from __future__ import annotations

__all__ = ["SESSION_ID_METADATA_KEY"]

# Proxies hash on this key (deploy/compose/nginx.conf, deploy/k8s/envoy.yaml); lowercase, as
# gRPC metadata keys must be.
SESSION_ID_METADATA_KEY = "rnnstream-session-id"
