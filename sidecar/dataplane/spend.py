"""What a call may cost in money before it runs, and what it cost after. Pure, no I/O.

Before (authorize): the worst case, reserved at every level with a budget —
    prompt tokens x input price + the output cap x output price, rounded up, where
    prompt tokens = a trusted proxy's x-prompt-tokens, else the body's bytes divided by
    prompt_bytes_per_token (2 by default: English text and JSON run near 4 bytes a
    token, other scripts lower, so 2 errs toward reserving more), and
    the output cap = the body's top-level max_tokens / max_completion_tokens /
    max_output_tokens (the largest given), else default_max_output_tokens.
After (settle): the reported usage at the model's price (schema/money.py), in the
dialects of the upstreams: OpenAI prompt_tokens / completion_tokens with
prompt_tokens_details.cached_tokens, Anthropic input_tokens / output_tokens with
cache_read_input_tokens and cache_creation_input_tokens.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..schema.money import MAX_TOKENS, PriceList, Usage, prompt_estimate, reservation
from .request import json_doc

UNPRICED = -1                   # authorize.lua: the model has no price
PROMPT_HEADER = "x-prompt-tokens"
_CAPS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class Estimator:
    def __init__(self, prices: PriceList, default_output: int, bytes_per_token: int):
        self.prices = prices
        self.default_output = default_output
        self.bytes_per_token = bytes_per_token

    def worst_case(self, model: str, body: bytes, headers: Mapping[str, str],
                   trusted: bool) -> int:
        """Micro-units the call may cost at most, or UNPRICED."""
        price = self.prices.of(model) if self.prices else None
        if price is None:
            return UNPRICED
        prompt = trusted_tokens(headers) if trusted else None
        if prompt is None:
            prompt = prompt_estimate(_body_size(body, headers), self.bytes_per_token)
        return reservation(price, prompt, output_cap(body) or self.default_output)


def trusted_tokens(headers: Mapping[str, str]) -> int | None:
    given = headers.get(PROMPT_HEADER)
    if given is None or not (given.isascii() and given.isdigit() and len(given) < 11):
        return None
    return min(int(given), MAX_TOKENS)


def _body_size(body: bytes, headers: Mapping[str, str]) -> int:
    """The body's length as the upstream gets it: Content-Length when it says more than
    was read (a body cut at max_body_bytes)."""
    given = headers.get("content-length", "")
    if given.isascii() and given.isdigit() and len(given) < 13:
        return max(int(given), len(body))
    return len(body)


def output_cap(body: bytes) -> int | None:
    """The largest output cap the JSON body sets at its top level, or None."""
    if b"max_" not in body:
        return None
    doc = json_doc(body)      # parsed once with the model rule's read (request.py)
    if not isinstance(doc, dict):
        return None
    caps = [v for k in _CAPS if isinstance(v := doc.get(k), int) and not isinstance(v, bool)
            and v > 0]
    return min(max(caps), MAX_TOKENS) if caps else None


def usage_of(doc: Mapping) -> Usage | None:
    """The tokens a usage object reports (OpenAI or Anthropic shape), or None when it
    reports none. Raises ValueError naming a field that is not a whole number."""
    def whole(obj: Mapping, name: str) -> int:
        value = obj.get(name, 0)
        if value is None:
            return 0
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_TOKENS:
            raise ValueError(f"{name}: a whole number between 0 and {MAX_TOKENS}")
        return value

    if "prompt_tokens" in doc or "completion_tokens" in doc:       # OpenAI
        details = doc.get("prompt_tokens_details") or {}
        if not isinstance(details, Mapping):
            raise ValueError("prompt_tokens_details: an object")
        prompt = whole(doc, "prompt_tokens")
        return Usage(prompt, whole(doc, "completion_tokens"),
                     min(whole(details, "cached_tokens"), prompt))
    if "input_tokens" in doc or "output_tokens" in doc:            # Anthropic, Responses
        read = whole(doc, "cache_read_input_tokens")
        details = doc.get("input_tokens_details") or {}
        if not isinstance(details, Mapping):
            raise ValueError("input_tokens_details: an object")
        # Anthropic counts cache reads and writes beside input_tokens; OpenAI's Responses
        # API counts cached tokens inside input_tokens.
        total = whole(doc, "input_tokens") + read + whole(doc, "cache_creation_input_tokens")
        cached = read + whole(details, "cached_tokens")
        return Usage(total, whole(doc, "output_tokens"), min(cached, total))
    return None
