"""One exception type for every user-facing failure: the CLI prints it as one line and exits 2."""


# Stage process exit codes (docs/internals.md): the CLI, the training loop, the torchrun wrapper
# and the sbatch template all use these.
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 99


class CompTError(Exception):
    """A problem with the user's input or environment (spec, paths, checkpoints, loss)."""


def read_json(path, what: str = "file") -> dict:
    """A JSON object from disk, or one CompTError line naming the file and the problem."""
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise CompTError(f"{what} not found: {p}")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CompTError(f"{p}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise CompTError(f"{p}: not a text file") from None
    if not isinstance(data, dict):
        raise CompTError(f"{p}: top level must be a JSON object")
    return data
