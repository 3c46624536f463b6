"""Source and model artefacts: signed manifests, tensor-level reads, git packs (docs/artefacts.md)."""

from anvil.artefacts.service import ArtefactService

__all__ = ["ArtefactService"]
