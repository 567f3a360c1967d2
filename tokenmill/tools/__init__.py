"""Tool calling: each model family's call syntax (formats) and the parsers for its output."""

from tokenmill.tools.formats import FORMATS, ToolCallFormat, declaration, format_for_template, template_renders_tools
from tokenmill.tools.parsing import ToolCallParser

__all__ = [
    "FORMATS",
    "ToolCallFormat",
    "ToolCallParser",
    "declaration",
    "format_for_template",
    "template_renders_tools",
]
