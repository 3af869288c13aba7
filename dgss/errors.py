"""Errors that the command line reports as one line (no traceback)."""


class ConfigError(ValueError):
    """Bad user input: a config key, value or file. The message names it and says how to fix it."""


class TrainingAborted(RuntimeError):
    """A run stopped on purpose (e.g. too many non-finite losses in a row); the message says what was kept."""


def state_mismatch(ours, theirs, shown: int = 5) -> str | None:
    """What keeps ``theirs`` (name -> tensor) from loading strictly into ``ours``: "missing: …; unexpected: …;
    shape mismatch: …" (the first ``shown`` of each), or None when it fits."""
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}"
              for k in ours if k in theirs and theirs[k].shape != ours[k].shape]  # fmt: skip
    # a float tensor's values from integers (load_state_dict would cast them silently): not a weights release
    dtypes = [f"{k} {theirs[k].dtype} vs {ours[k].dtype}" for k in ours if k in theirs and ours[k].is_floating_point()
              and not (theirs[k].is_floating_point() or theirs[k].is_complex())]  # fmt: skip
    parts = [f"{label}: {', '.join(keys[:shown])}{f' (+{len(keys) - shown} more)' if len(keys) > shown else ''}"
             for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes),
                                 ("not floating point", dtypes)) if keys]  # fmt: skip
    return "; ".join(parts) or None
