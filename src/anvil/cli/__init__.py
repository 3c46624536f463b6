"""The `anvil` command line."""

import os
import sys

FSCK_HASH_THREADS = 2  # `anvil fsck`'s hashing threads (its children's too)


def _stopped_while_starting(_signum: int, _frame: object) -> None:
    # Ctrl-C on `anvil serve` (and `make run`) while the command is still importing: nothing is open
    # yet, so end now, quietly and successfully (exit 0: make then reports no error), rather than
    # with a KeyboardInterrupt traceback. `serve` takes over the signal once it starts.
    os.write(2, b"\nanvil serve: stopped before it started\n")
    os._exit(0)


if sys.argv[1:2] == ["serve"]:
    import signal

    signal.signal(signal.SIGINT, _stopped_while_starting)


def _storage_path_of(args: list[str]) -> str | None:
    """The value of --storage-path in `args` (either spelling), else None."""
    for i, arg in enumerate(args):
        if arg == "--storage-path" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--storage-path="):
            return arg.partition("=")[2]
    return None


def start_deep_fsck_children(storage_path: str) -> None:
    """Start the catalog's and the blob files' checking children of `fsck --deep` on `storage_path`
    (`start_early`: one per store, so a second call finds the first's), for the command to take."""
    from anvil.storage import blobwalk, catalogcheck

    catalogcheck.start_early(os.path.join(storage_path, "catalog.db"), FSCK_HASH_THREADS)
    blobwalk.start_early(os.path.join(storage_path, "blobs", "sha256"), FSCK_HASH_THREADS)


def _start_from_command_line(args: list[str]) -> None:
    """`anvil fsck --deep --storage-path DIR`: the children start now, before click and the command's
    modules are imported (~55 ms on one core), so they hash on the other core meanwhile; the command
    calls `start_deep_fsck_children` again once click has parsed its line and takes their answers.
    Whatever it does not take (another store, a usage error) is ended at exit."""
    storage_path = _storage_path_of(args)
    if "--deep" not in args or not storage_path:
        return
    import atexit

    from anvil.storage import blobwalk, catalogcheck

    start_deep_fsck_children(storage_path)
    atexit.register(catalogcheck.discard_early)
    atexit.register(blobwalk.discard_early)


if sys.argv[1:2] == ["fsck"]:
    _start_from_command_line(sys.argv[2:])
