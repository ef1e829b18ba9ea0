"""``.. cli-reference::``: the ``inrlddmm`` command's help, generated from its argparse parser.

For the main parser and each subcommand it emits a section with the command's own help text
(``format_help()``, the exact text that ``inrlddmm COMMAND --help`` prints) as a literal block, so
the reference can never drift from the code.  Options: ``:module:`` and ``:func:`` name the function
that builds the parser.
"""

from __future__ import annotations

import argparse
import importlib
import os

from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


class CLIReference(SphinxDirective):
    has_content = False
    option_spec = {"module": directives.unchanged_required, "func": directives.unchanged_required,
                   "prog": directives.unchanged}

    def run(self):
        os.environ["COLUMNS"] = "100"  # argparse wraps the help to the terminal width: fix it
        build = getattr(importlib.import_module(self.options["module"]), self.options["func"])
        parser = build()
        prog = self.options.get("prog", parser.prog)
        out = [nodes.literal_block(text=parser.format_help(), language="none")]
        for name, sub in _subcommands(parser).items():
            section = nodes.section(ids=[nodes.make_id(f"{prog}-{name}")])
            section += nodes.title(text=f"{prog} {name}")
            section += nodes.literal_block(text=sub.format_help(), language="none")
            out.append(section)
        return out


def setup(app):
    app.add_directive("cli-reference", CLIReference)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
