"""One --help style for every command-line entry point: each flag's line ends with its default;
and one error style: a bad flag is one ``error: ...`` line and exit status 2, as for bad input."""

import argparse
import sys


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: ...)`` to each flag's help, except where the text already states its
    default or the flag is required; the description keeps its own line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse prints its whole usage block before a flag error; ours is the one line the stages
    print for every other bad input (sub-commands inherit it)."""

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def new_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    return Parser(description=description, formatter_class=HelpFormatter, **kwargs)
