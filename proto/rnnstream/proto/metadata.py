"""Request metadata keys of the rnnstream.v1 protocol (hand-written, not generated)."""

from __future__ import annotations

__all__ = ["PACK_OUTPUTS_METADATA_KEY"]

# A Stream call whose metadata holds this key with value "1" accepts FrameOutputs messages:
# outputs answered together (one batch's, say) travel in one message instead of one each.
PACK_OUTPUTS_METADATA_KEY = "rnnstream-pack-outputs"
