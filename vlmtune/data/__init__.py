"""Data: sources (file, folder, Hub id) -> rows -> Conversation, plus synthetic demo receipts."""

from vlmtune.data.formats import (
    CAPTION_PROMPT,
    CORD_PROMPT,
    FORMATS,
    Conversation,
    DataError,
    SampleError,
    check_columns,
    detect_format,
    json_to_tokens,
    required_columns,
    resolve_format,
    to_conversation,
    tokens_to_json,
)
from vlmtune.data.sources import Rows, load_rows
from vlmtune.data.synthetic import write_synthetic_cord

__all__ = [
    "CAPTION_PROMPT",
    "CORD_PROMPT",
    "FORMATS",
    "Conversation",
    "DataError",
    "Rows",
    "SampleError",
    "check_columns",
    "detect_format",
    "json_to_tokens",
    "load_rows",
    "required_columns",
    "resolve_format",
    "to_conversation",
    "tokens_to_json",
    "write_synthetic_cord",
]
