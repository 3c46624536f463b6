"""The recovery participants of every subsystem, composed: what backup, restore, fsck, gc, the
drill and the conformance suite run over (`anvil.runtime` re-exports `recovery_participants`).

Apart from the runtime so that an offline tool (`anvil fsck --storage-path`) builds the list
without importing every service: each participant module imports only what its checks use,
and what the runtime composes into them (authz's row-binding checks) is loaded on first call.
"""

from __future__ import annotations

from typing import Any

from anvil.artefacts.participant import ArtefactsParticipant, ArtefactTensorsParticipant
from anvil.authz.participant import AuthzParticipant
from anvil.diagnostics.participant import DiagnosticsParticipant
from anvil.identity.participant import IdentityParticipant
from anvil.indexes.participant import IndexesParticipant
from anvil.objects.participant import ObjectsParticipant
from anvil.personaldb.participant import PersonalDbParticipant, ProjectionsParticipant
from anvil.storage.participant import (
    BlobDigestsParticipant,
    BlobsParticipant,
    JournalParticipant,
    StorageParticipant,
)
from anvil.storage.recovery import Participant
from anvil.watch.events import register_kinds
from anvil.watch.participant import WatchParticipant

# Watchers may ask for artefact, index-definition and PersonalDB events (`kinds=artefact.*`,
# `index.*`, `pdb.*`); they are not in the default families. Registered once, at import (the
# watch participant checks consumers' filters against them).
register_kinds("artefact", {"artefact.push", "artefact.sign", "artefact.tag", "artefact.key_add", "artefact.upload",
                            "artefact.uploads_drop"})
register_kinds("index", {"index.create", "index.update", "index.disable", "index.enable", "index.drop"})


def _register_pdb() -> None:
    from anvil.personaldb.service import EVENT_KINDS

    register_kinds("pdb", EVENT_KINDS)


_register_pdb()


def binding_problem(*args: Any) -> Any:
    from anvil.authz.rows import binding_problem as impl

    return impl(*args)


def relations_at(*args: Any) -> Any:
    from anvil.authz.rows import relations_at as impl

    return impl(*args)


def recovery_participants() -> list[Participant]:
    """Every subsystem's recovery participant, in the order reports list them; a new subsystem
    appends its own here and thereby joins backup, restore, fsck, gc, the drill and the
    conformance suite."""
    return [StorageParticipant(), JournalParticipant(), ObjectsParticipant(), BlobsParticipant(),
            BlobDigestsParticipant(), IdentityParticipant(), WatchParticipant(), DiagnosticsParticipant(),
            AuthzParticipant(), ArtefactsParticipant(), ArtefactTensorsParticipant(),
            PersonalDbParticipant(binding_problem=binding_problem),
            ProjectionsParticipant(relations=relations_at), IndexesParticipant()]
