"""One exception type for every user-facing failure: the CLI prints it as one line and exits 2."""


class CompTError(Exception):
    """A problem with the user's input or environment (spec, paths, checkpoints, loss)."""


def fail(msg: str) -> "CompTError":
    return CompTError(msg)
