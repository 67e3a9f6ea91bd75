"""The --help layout both command-line tools share (drlora-train, drlora-serve)."""

from __future__ import annotations

import argparse


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Options that take a value show their default, unless their help already names it (argparse's
    ArgumentDefaultsHelpFormatter skips options without help, and rewraps the epilog)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.nargs == 0 or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS
                or action.default == []):
            return text
        return f"{text} (default: %(default)s)".lstrip()
