"""PersonalDB: a witness for local-first SQLite (changesets, signed commit certificates, catch-up,
snapshots). The server side is `PersonalDbService`; the SDK side is `Replica` (anvil.personaldb.replica)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from anvil.personaldb.service import PersonalDbService

__all__ = ["PersonalDbService", "ProjectionReplica", "Replica"]


def __getattr__(name: str) -> Any:
    # The service on first use (`anvil fsck` imports only the participant); the replica is
    # SDK-side: imported on demand so the server never loads it.
    if name == "PersonalDbService":
        from anvil.personaldb.service import PersonalDbService

        return PersonalDbService
    if name == "Replica":
        from anvil.personaldb.replica import Replica

        return Replica
    if name == "ProjectionReplica":
        from anvil.personaldb.replica import ProjectionReplica

        return ProjectionReplica
    raise AttributeError(name)
