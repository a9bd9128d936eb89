"""Hex numbers, the 2000 epoch and multiplier/divisor scaling of the EAGLE APIs.

Both sides of the wire use this module: the drivers decode with it and the
device simulator encodes with it, so the two agree by construction.

>>> encode_signed_hex(-1000, 8)
'0xfffffc18'
>>> decode_signed_hex("0xfffffc18")
-1000
>>> scale(0x001738, 1, 0x3E8, 1000)  # 5.944 kW in W
5944.0
>>> unix_from_2000(seconds_since_2000(1_700_000_000))
1700000000
"""

from __future__ import annotations

import operator
import re

EPOCH_2000_UNIX = 946_684_800
"""2000-01-01T00:00:00Z in Unix seconds: the EAGLE's TimeStamp epoch."""

MAX_HEX_DIGITS = 16
"""The widest field the EAGLE sends (MAC ids, 64-bit summations)."""

MIN_SIGNED_DIGITS = 6
"""ZigBee's demand is an int24; shorter values are unpadded magnitudes."""


_HEX_DIGITS = re.compile(rf"\s*(?:0[xX])?([0-9A-Fa-f]{{1,{MAX_HEX_DIGITS}}})\s*")
"""Optional blanks and ``0x``, then the digits: int(text, 16) alone would also
take "+", "-", "_" and inner blanks."""


def _digits(text: str) -> str:
    match = _HEX_DIGITS.fullmatch(text)
    if match is None:
        raise ValueError(f"not a hex number of at most {MAX_HEX_DIGITS} digits")
    return match.group(1)


def decode_unsigned_hex(text: str) -> int:
    """``"0x0003e8"`` -> 1000. Raises ValueError on anything else."""
    return int(_digits(text), 16)


def decode_signed_hex(text: str) -> int:
    """Two's complement by the digit count: 6 digits are 24-bit, 8 are 32-bit.

    Values with fewer than six or an odd number of digits are taken as
    non-negative: they come from firmware that dropped the zero padding, and
    reading ``0x9c4`` as negative would flip a 2.5 kW load into export.
    """
    digits = _digits(text)
    value = int(digits, 16)
    width = len(digits)
    if width >= MIN_SIGNED_DIGITS and width % 2 == 0:
        bits = 4 * width
        if value >> (bits - 1):
            value -= 1 << bits
    return value


def encode_unsigned_hex(value: int, digits: int) -> str:
    """1000, 6 -> ``"0x0003e8"``. Raises ValueError if it does not fit."""
    if not 1 <= digits <= MAX_HEX_DIGITS:
        raise ValueError(f"digits must be 1..{MAX_HEX_DIGITS}")
    if not 0 <= value < 1 << (4 * digits):
        raise ValueError(f"{value} does not fit in {digits} hex digits")
    return f"0x{value:0{digits}x}"


def encode_signed_hex(value: int, digits: int) -> str:
    """-1000, 8 -> ``"0xfffffc18"``: two's complement in ``digits`` digits.

    ``digits`` must be even and at least 6 so that :func:`decode_signed_hex`
    reads the sign back.
    """
    if digits < MIN_SIGNED_DIGITS or digits % 2 or digits > MAX_HEX_DIGITS:
        raise ValueError(f"signed fields take an even number of 6..{MAX_HEX_DIGITS} digits")
    bits = 4 * digits
    if not -(1 << (bits - 1)) <= value < 1 << (bits - 1):
        raise ValueError(f"{value} does not fit in {bits} signed bits")
    return f"0x{value & ((1 << bits) - 1):0{digits}x}"


def seconds_since_2000(unix: float) -> int:
    """Unix seconds -> the EAGLE TimeStamp value (whole seconds, floored)."""
    return int(unix // 1) - EPOCH_2000_UNIX


def unix_from_2000(seconds: int) -> int:
    """The EAGLE TimeStamp value -> Unix seconds."""
    return seconds + EPOCH_2000_UNIX


def scale(raw: int, multiplier: int, divisor: int, unit_factor: int = 1) -> float:
    """``raw * multiplier / divisor * unit_factor``; a zero multiplier or
    divisor means 1, as the manual says. One division keeps it exact for
    integers below 2**53 (``unit_factor=1000``: kW -> W, kWh -> Wh), and
    Python's int division rounds correctly past it.

    >>> scale(643545, 111969785, 3, 1000)  # past 2**53: the nearest float
    2.4019198429275e+16
    """
    # operator.truediv, not `/`: compiled (poller.build), `/` between two
    # ints goes through doubles, off by one in the last digit past 2**53.
    quotient: float = operator.truediv(raw * (multiplier or 1) * unit_factor, divisor or 1)
    return quotient


def encode_scaled(value: float, multiplier: int, divisor: int) -> int:
    """The raw integer the meter would send for ``value`` (kW or kWh)."""
    return round(value * (divisor or 1) / (multiplier or 1))
