"""What POST /api/v1/search accepts, declared and enforced from one definition.

`SearchContract` holds what depends on the served index (the largest k, the filterable attributes,
the re-ranking methods it offers). From it come both the request bodies' JSON Schemas in
/openapi.json and the checks the server applies, so a request the document calls valid is searched
and one it calls invalid is refused (400, or 413/415/422 for the image's size and content, which a
schema cannot describe):

    application/json     {"image": "<base64>" or "data:<type>/<subtype>;base64,<base64>",
                          "k": 1..max_k, "filter": {"<attribute>": "value" or ["value", ...]},
                          "rerank": one of the index's methods}; no other key
    multipart/form-data  the file in `image`, `k` as a decimal integer, `filter` repeated, each
                         "<attribute>=<value>" terms joined by ';', `rerank`; no other field

Regular expressions here use only syntax that Python, ECMAScript and Rust read alike, so the pattern
in the document means what the server checks.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from app.api_errors import ApiError

DEFAULT_K = 10
MAX_FILTER_FIELDS = 8  # repeated `filter` fields of one multipart request
FORM_FIELDS = ("image", "k", "filter", "rerank")
JSON_FIELDS = FORM_FIELDS
IMAGE_FORMAT = "image-base64"  # the JSON `image`'s format: an image file's bytes, base64 (or a data: URL)
_BASE64 = r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{4}|[A-Za-z0-9+/]{3}=|[A-Za-z0-9+/]{2}==)"
_DATA_URL = r"data:[A-Za-z0-9.+-]{1,64}/[A-Za-z0-9.+-]{1,64};base64,"
IMAGE_TEXT_PATTERN = f"^(?:{_DATA_URL})?{_BASE64}$"
_IMAGE_TEXT = re.compile(IMAGE_TEXT_PATTERN)
_FORM_K = re.compile(r"(0|[1-9][0-9]{0,17})(?:\.0+)?")  # JSON Schema's integers: 14 and 14.0 alike
EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAQAAAAECAIAAAAmkwkpAAAAFElEQVR42mM8UaHBAANMDEgANwcA"
    "R/QBcPbvf+MAAAAASUVORK5CYII="
)  # a 4x4 orange PNG: the document's example, searchable as is
_SYNTAX = set("^$\\.*+?()[]{}|")


def regex_literal(text: str) -> str:
    """`text` as a regular expression matching itself, escaping only the characters that are syntax
    in every dialect (ECMAScript's unicode mode refuses other escapes)."""
    return "".join("\\" + c if c in _SYNTAX else c for c in text)


@dataclass(frozen=True)
class SearchParams:
    """A checked search request, without its image."""

    k: int
    where: dict[str, list[str]] | None  # attribute -> accepted values; None = no filter
    rerank: str


@dataclass(frozen=True)
class SearchContract:
    """The search request's bounds for one served index (see the module docstring)."""

    max_k: int
    attributes: tuple[str, ...]  # filterable attributes, sorted
    rerank: tuple[str, ...]  # re-ranking methods the index offers ("none" first)
    max_upload_bytes: int

    @property
    def default_k(self) -> int:
        return min(DEFAULT_K, self.max_k)

    # --- the document ------------------------------------------------------------------------------

    def filter_term_pattern(self) -> str:
        keys = "|".join(regex_literal(a) for a in self.attributes)
        term = f"(?:{keys})=[^;]+"
        return f"^{term}(?:;{term})*$"

    def _common_properties(self) -> dict[str, Any]:
        return {
            "k": {
                "type": "integer",
                "minimum": 1,
                "maximum": self.max_k,
                "default": self.default_k,
                "description": "results to return",
            },
            "rerank": {
                "type": "string",
                "enum": list(self.rerank),
                "default": "none",
                "description": "re-ranking to apply: the methods this index offers",
            },
        }

    def json_schema(self) -> dict[str, Any]:
        """The application/json body."""
        properties: dict[str, Any] = {
            "image": {
                "type": "string",
                "format": IMAGE_FORMAT,
                "pattern": IMAGE_TEXT_PATTERN,
                "examples": [EXAMPLE_IMAGE],
                "description": "the query image file (JPEG, PNG, WebP, GIF, BMP, TIFF) in base64, bare or "
                f"as a data: URL; at most {self.max_upload_bytes:,} bytes once decoded. "
                "URLs to fetch are refused.",
            },
            **self._common_properties(),
        }
        if self.attributes:
            value = {"type": "string", "minLength": 1}
            properties["filter"] = {
                "type": "object",
                "additionalProperties": False,
                "description": "keep items whose attributes match: attribute -> a value or a list of values "
                "(any of them); several attributes must all match",
                "properties": {a: {"anyOf": [value, {"type": "array", "items": value}]} for a in self.attributes},
            }
        return {
            "title": "SearchQuery",
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "properties": _ordered(properties),
        }

    def form_schema(self) -> dict[str, Any]:
        """The multipart/form-data body."""
        properties: dict[str, Any] = {
            "image": {
                "type": "string",
                "format": "binary",
                "description": f"the query image file; at most {self.max_upload_bytes:,} bytes",
            },
            **self._common_properties(),
        }
        if self.attributes:
            properties["filter"] = {
                "type": "array",
                "maxItems": MAX_FILTER_FIELDS,
                "items": {"type": "string", "pattern": self.filter_term_pattern()},
                "description": "repeat the field for more terms: `attribute=value`, several joined by ';'; "
                "values of one attribute are OR-ed, attributes AND-ed",
            }
        return {
            "title": "SearchForm",
            "type": "object",
            "required": ["image"],
            "additionalProperties": False,
            "properties": _ordered(properties),
        }

    # --- the checks -------------------------------------------------------------------------------

    def json_params(self, body: Any) -> tuple[str, SearchParams]:
        """(the image text, the parameters) of a JSON body, or ApiError 400."""
        if not isinstance(body, dict):
            raise ApiError(400, "bad_request", "the JSON body must be an object with `image`")
        _refuse_unknown(body, self._json_fields(), "key")
        image = body.get("image")
        if not isinstance(image, str):
            raise ApiError(400, "bad_request", "`image` is required: the image file in base64 or a data: URL")
        k = self.check_k(body["k"]) if "k" in body else self.default_k
        where = self.json_filter(body["filter"]) if "filter" in body else None
        rerank = self.check_rerank(body["rerank"]) if "rerank" in body else "none"
        return image, SearchParams(k, where, rerank)

    def form_params(self, fields: Sequence[tuple[str, Any]]) -> tuple[Any, SearchParams]:
        """(the `image` part, the parameters) of multipart fields [(name, value)], or ApiError 400."""
        _refuse_unknown(dict(fields), self._json_fields(), "field")
        values: dict[str, list[Any]] = {}
        for name, value in fields:
            values.setdefault(name, []).append(value)
        for name in ("image", "k", "rerank"):
            if len(values.get(name, [])) > 1:
                raise ApiError(400, "bad_request", f"the field `{name}` is sent more than once")
        text_fields = {n: v for n, v in values.items() if n != "image"}
        for name, items in text_fields.items():
            if any(not isinstance(v, str) for v in items):
                raise ApiError(400, "bad_request", f"the field `{name}` must be text, not a file")
        k = self.check_k(self._form_int(values["k"][0])) if "k" in values else self.default_k
        terms = values.get("filter", [])
        if len(terms) > MAX_FILTER_FIELDS:
            raise ApiError(400, "bad_request", f"at most {MAX_FILTER_FIELDS} `filter` fields; join terms with ';'")
        where = self.form_filter(terms) if terms else None
        rerank = self.check_rerank(values["rerank"][0]) if "rerank" in values else "none"
        return (values["image"][0] if "image" in values else None), SearchParams(k, where, rerank)

    def image_text_ok(self, text: str) -> bool:
        """Whether the JSON `image` text follows the document's pattern (checked after the intake
        refused URLs and sizes, so those get their own answers)."""
        return _IMAGE_TEXT.fullmatch(text) is not None

    def check_k(self, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():  # 14.0 is an integer to JSON Schema
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ApiError(400, "bad_request", f"`k` must be an integer, got {_short(value)}")
        if not 1 <= value <= self.max_k:
            raise ApiError(400, "bad_request", f"`k` must be between 1 and {self.max_k}, got {value}")
        return value

    def check_rerank(self, value: Any) -> str:
        from retrieval.search.rerank import RERANK_METHODS

        if value in self.rerank:
            return str(value)
        if value in RERANK_METHODS:
            raise ApiError(
                400,
                "bad_request",
                f"`rerank` {value} is not available on this index "
                f"(available: {', '.join(self.rerank)}); build its neighbour lists "
                "with `retrieval index --out DIR --rerank-neighbours 10`",
            )
        raise ApiError(400, "bad_request", f"unknown `rerank` {_short(value)}; choose one of {', '.join(self.rerank)}")

    def json_filter(self, value: Any) -> dict[str, list[str]] | None:
        if not isinstance(value, dict):
            raise ApiError(
                400, "bad_request", 'the JSON `filter` must be an object: {"attribute": "value" or ["value", ...]}'
            )
        where: dict[str, list[str]] = {}
        for key, given in value.items():
            self._check_attribute(key)
            items = given if isinstance(given, list) else [given]
            if any(not isinstance(v, str) or not v for v in items):
                raise ApiError(400, "bad_request", f"filter values of {key!r} must be non-empty strings")
            if items:
                where[key] = sorted(set(items))
        return where or None

    def form_filter(self, fields: Sequence[str]) -> dict[str, list[str]] | None:
        where: dict[str, set[str]] = {}
        pattern = re.compile(self.filter_term_pattern())
        for field_value in fields:
            for term in field_value.split(";"):
                key, sep, value = term.partition("=")
                if not sep:
                    raise ApiError(
                        400,
                        "bad_request",
                        f"filter {term!r} is not KEY=VALUE (e.g. category=Dresses); join several terms with ';'",
                    )
                self._check_attribute(key)
                if not value:
                    raise ApiError(400, "bad_request", f"filter {term!r} needs a value (e.g. {key}=...)")
                where.setdefault(key, set()).add(value)
            if not pattern.fullmatch(field_value):  # what the checks above let through, the pattern does too
                raise ApiError(400, "bad_request", f"filter {field_value!r} does not match {pattern.pattern}")
        return {key: sorted(values) for key, values in where.items()} or None

    def _check_attribute(self, key: str) -> None:
        if key not in self.attributes:
            offered = ", ".join(self.attributes) or "none (this index stores no item attributes; rebuild it to filter)"
            raise ApiError(400, "bad_request", f"unknown filter attribute {key!r}; this index's items have: {offered}")

    def _json_fields(self) -> tuple[str, ...]:
        return JSON_FIELDS if self.attributes else tuple(f for f in JSON_FIELDS if f != "filter")

    @staticmethod
    def _form_int(text: str) -> Any:
        match = _FORM_K.fullmatch(text)
        return int(match.group(1)) if match else text


def contract_for(searcher: Any, max_k: int, rerank: Sequence[str], max_upload_bytes: int) -> SearchContract:
    """The contract of a Searcher's index."""
    return SearchContract(
        max_k=max(1, min(int(max_k), len(searcher.gallery_paths))),
        attributes=tuple(sorted(searcher.attribute_values)),
        rerank=tuple(rerank),
        max_upload_bytes=int(max_upload_bytes),
    )


def _refuse_unknown(given: Mapping[str, Any], known: tuple[str, ...], what: str) -> None:
    unknown = [name for name in given if name not in known]
    if unknown:
        raise ApiError(
            400,
            "bad_request",
            f"unknown {what} {_short(unknown[0])}; this request takes " + ", ".join(f"`{name}`" for name in known),
        )


def _ordered(properties: dict[str, Any]) -> dict[str, Any]:
    return {name: properties[name] for name in FORM_FIELDS if name in properties}


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
