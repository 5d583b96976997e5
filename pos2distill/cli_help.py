"""One --help style for every command-line entry point: each flag's line ends with its default."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: ...)`` to each flag's help, except where the text already states its
    default or the flag is required; the description keeps its own line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or "default" in text.lower():
            return text
        return super()._get_help_string(action)


def new_parser(description: str, **kwargs) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter, **kwargs)
