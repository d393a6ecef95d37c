"""Tool calling for the chat route: parsers for tool_choice "auto" (--tool-call-parser), and the
schemas that make "required" and named choices constrain decoding (tool_choice.py)."""
from serving.openai.tool_parsers.base import ParsedCall, ToolParser
from serving.openai.tool_parsers.hermes import HermesToolParser
from serving.openai.tool_parsers.llama3_json import Llama3JsonToolParser

PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}

__all__ = ["PARSERS", "ParsedCall", "ToolParser"]
