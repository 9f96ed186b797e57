"""Money: amounts, prices and the cost of a call, in integer micro-units. Pure.

Amounts are decimal strings in the deployment's currency ("5.00") and are stored and
counted as integers of micro-units (1 USD = 1,000,000): never floats, so no sum drifts
and the Lua scripts (whose numbers are doubles) stay exact below 2^53. A price is given
per million tokens, so in micro-units per million tokens it is an integer whenever the
price has at most 6 decimals (e.g. "0.075" per million -> 75,000).

The cost of a call is rounded up, once, over the whole sum: the house never loses a
micro-unit, and the client never pays more than one micro-unit above the exact price.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

MICRO = 1_000_000                  # micro-units per currency unit
MAX_AMOUNT = 10**15                # micro-units: 10^9 currency units; sums stay < 2^53
MAX_PRICE = 10**10                 # micro-units per million tokens: 10,000 per million
MAX_TOKENS = 10**9                 # per call and per report
_AMOUNT = re.compile(r"(\d{1,10})(?:\.(\d{1,6}))?")


class BadAmount(ValueError):
    """Not an amount: the message says what is expected."""


def parse_amount(text: Any, limit: int = MAX_AMOUNT, what: str = "amount") -> int:
    """Micro-units of a decimal string ("5", "5.00", "0.000001"); BadAmount otherwise.
    Numbers are refused on purpose: a JSON 0.1 is already a float approximation."""
    if not isinstance(text, str):
        raise BadAmount(f"{what}: a decimal string such as \"5.00\"")
    match = _AMOUNT.fullmatch(text.strip())
    if not match:
        raise BadAmount(f"{what}: a decimal string such as \"5.00\", at most 6 decimals, "
                        f"got {text[:40]!r}")
    whole, frac = match.group(1), match.group(2) or ""
    micro = int(whole) * MICRO + int(frac.ljust(6, "0"))
    if micro > limit:
        raise BadAmount(f"{what}: at most {format_amount(limit)}")
    return micro


def format_amount(micro: int) -> str:
    """"5.00" for 5,000,000; as many decimals as needed beyond two ("0.000125")."""
    sign, micro = ("-", -micro) if micro < 0 else ("", micro)
    whole, frac = divmod(micro, MICRO)
    digits = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{digits}"


@dataclass(frozen=True, slots=True)
class Price:
    """Micro-units per million tokens: input, output, and cached input (cheaper reads
    of a cached prompt; the input price when not given)."""
    input: int
    output: int
    cached_input: int

    @classmethod
    def parse(cls, doc: Any, what: str) -> Price:
        if not isinstance(doc, dict) or not {"input", "output"} <= doc.keys() \
                or not doc.keys() <= {"input", "output", "cached_input"}:
            raise BadAmount(f"{what}: a mapping with input, output (and optionally "
                            "cached_input) prices per million tokens")
        found = {k: parse_amount(str(v) if isinstance(v, int | float) else v, MAX_PRICE,
                                 f"{what}.{k}") for k, v in doc.items()}
        return cls(found["input"], found["output"], found.get("cached_input", found["input"]))


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one call: input (all prompt tokens, cached ones included), of which
    cached, and output."""
    input: int
    output: int
    cached: int = 0


def cost(price: Price, usage: Usage) -> int:
    """Micro-units for `usage` at `price`, rounded up once over the sum. Cached tokens are
    part of the input and priced at cached_input; never more than the input."""
    cached = min(usage.cached, usage.input)
    return _micro((usage.input - cached) * price.input + cached * price.cached_input
                  + usage.output * price.output)


def reservation(price: Price, prompt_tokens: int, output_cap: int) -> int:
    """The worst case a call may cost before its usage is known: every prompt token at
    the full input price and the whole output cap, i.e. cost(price, Usage(prompt_tokens,
    output_cap)) without building the Usage on every authorize call."""
    return _micro(prompt_tokens * price.input + output_cap * price.output)


def _micro(total: int) -> int:
    """Micro-units of a total in micro-units per million tokens, rounded up."""
    return -(-total // MICRO)


def prompt_estimate(body_bytes: int, bytes_per_token: int) -> int:
    """Prompt tokens a body of this many bytes is taken to hold, rounded up."""
    return -(-body_bytes // bytes_per_token)


class PriceList:
    """The deployment's prices by model, with an optional default for the rest."""

    def __init__(self, prices: dict[str, Price], default: Price | None = None):
        self.prices = prices
        self.default = default

    @classmethod
    def parse(cls, prices: Any, default: Any) -> PriceList:
        if prices is None:
            prices = {}
        if not isinstance(prices, dict):
            raise BadAmount("prices: a mapping of model -> {input, output, cached_input}")
        table = {str(m): Price.parse(p, f"prices.{m}") for m, p in prices.items()}
        return cls(table, None if default is None else Price.parse(default, "default_price"))

    def __bool__(self) -> bool:
        return bool(self.prices) or self.default is not None

    def of(self, model: str) -> Price | None:
        """The price of `model`, the default, or None: the model cannot be priced."""
        return self.prices.get(model, self.default)
