"""The one kind of error a user can fix by changing what they gave the job."""


class BadInput(ValueError):
    """A config key, an input file or a service named in the config that cannot be used.

    The message names the key, file or URL at fault; the command line prints it as one line
    and exits 2 (a run that fails for any other reason exits 1)."""


class Interrupted(RuntimeError):
    """Stopped before the end (Ctrl-C, `ray job stop`) with its state saved: the same command continues it."""
