"""The one exception type for user mistakes (bad config, broken dataset, missing model).

Anything raised as `StudioError` is shown to the user as its message alone — no traceback — by the CLI and the UI.
Everything else is a bug and keeps its traceback.
"""


class StudioError(Exception):
    """A problem the user can fix; the message says what was wrong, where, and how to fix it."""


def refuse_pickle(what: str, fix: str) -> StudioError:
    """The one wording for a pickle Studio will not unpickle: `what` names the file, `fix` says what to do instead."""
    return StudioError(f"{what}. Loading a pickle can run arbitrary code hidden in the file, so Studio refuses it.\n"
                       f"{fix}")
