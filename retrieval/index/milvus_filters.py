"""Metadata filters as Milvus boolean expressions, every name and value a quoted, escaped string literal.

A filter (retrieval.index.filters.Where: attribute -> accepted values) becomes

    (attributes["category"] == "Dresses" or attributes["category"] == "Skirts") and (attributes["gender"] == "WOMEN")

over the collection's JSON field of item attributes. Values come from users (`--where`, the API's `filter`), so
none is ever pasted into the expression as it is: each is written as a double-quoted literal in which the only
characters Milvus's lexer treats specially inside one, the backslash and the double quote, are escaped. A value
holding `"`, `\\`, ` or `, `)` or a whole expression fragment therefore stays one literal and matches only items
whose attribute is exactly that text. Control characters (newlines, NUL ...) have no escape Milvus accepts in
every version, so a value holding one is refused (FilterError) rather than sent.
"""

from __future__ import annotations

from retrieval.index.filters import FilterError, Where

ATTRIBUTES_FIELD = "attributes"


def string_literal(text: str) -> str:
    """`text` as a Milvus double-quoted string literal; FilterError for a control character."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise FilterError(f"filter value {text!r} holds a control character; filters match printable text only")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def where_expression(where: Where, field: str = ATTRIBUTES_FIELD) -> str:
    """The Milvus boolean expression of `where` (keys AND-ed, a key's values OR-ed); "" for no filter."""
    clauses = []
    for key in sorted(where):
        path = f"{field}[{string_literal(key)}]"
        values = " or ".join(f"{path} == {string_literal(v)}" for v in sorted(where[key]))
        clauses.append(f"({values})")
    return " and ".join(clauses)


def keys_expression(keys: list[int]) -> str:
    """`key in [...]` over primary keys (integers: nothing to escape)."""
    return "key in [" + ", ".join(str(int(k)) for k in keys) + "]"
