"""What goes wrong for a user, said in one line: the errors the scripts raise, and how a script's main runs."""

import os
import sys


class UserError(Exception):
    """A problem the user can fix; reported as one line, without a traceback."""


class ImageReadError(Exception):
    """An image file that cannot be read; its message says why, after the file's name."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a line saying what the interrupted run left behind (when that is more than nothing)."""


def run_main(main, args):
    """Run a script's main(args): user errors and Ctrl-C become one line and a non-zero exit.

    Returns main's result; a main that must report failure raises UserError (exit 1) or
    returns and lets the script's caller decide; nothing here calls sys.exit but for those two.
    """
    debug = getattr(args, "debug", False) or os.environ.get("FER_DEBUG")
    try:
        return main(args)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as e:
        if debug:
            raise
        what = str(e) if isinstance(e, Interrupted) and str(e) else "earlier outputs were left as they were"
        print(f"interrupted: {what}", file=sys.stderr)
        sys.exit(130)
