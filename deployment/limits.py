"""Every count and number the tool accepts, with its one range and its one parser.

The CLI (argparse types), the fab tasks (which parse with the same argparse parsers) and
the inventory validator all go through `Limit.parse` / `Limit.check`, so `--keep -1`,
`--keep 0`, `--keep 18446744073709551615` and `backup: {keep: 1e30}` are refused alike,
before anything can reach a remote script (where a huge count could wrap in a shell's
arithmetic and turn a retention rule into "delete everything").
"""

from __future__ import annotations

import decimal
import math
import re
from dataclasses import dataclass

_DIGITS = re.compile(r"[0-9]{1,12}")


@dataclass(frozen=True)
class Limit:
    what: str  # in an error: "keep", "tail", ...
    low: float
    high: float
    integer: bool = True

    def describe(self) -> str:
        if self.integer:
            return f"a whole number from {int(self.low)} to {int(self.high)}"
        return f"a number from {self.low:g} to {self.high:g}"

    def parse(self, text: str) -> int | float:
        """A count as typed on a command line. Raises ValueError with the one-line reason."""
        text = text.strip() if isinstance(text, str) else text
        if not isinstance(text, str):
            raise ValueError(f"{self.what} must be {self.describe()}, not {text!r}")
        if self.integer:
            if not _DIGITS.fullmatch(text):
                raise ValueError(f"{self.what} must be {self.describe()}, not {text!r}")
            return self.check(int(text))
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{self.what} must be {self.describe()}, not {text!r}") from None
        return self.check(value)

    def check(self, value) -> int | float:
        """A value already typed (from YAML): the right type and inside the range."""
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{self.what} must be {self.describe()}, not {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.what} must be {self.describe()}, not {value!r}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.what} must be {self.describe()}, not {_shown(value)}")
        return value


def _shown(value) -> str:
    """A number for an error line: huge ones shortened (an int of 400 digits has no float)."""
    if isinstance(value, int) and abs(value) >= 10**15:
        return format(decimal.Decimal(value), ".2e")
    return f"{value:.3g}" if abs(value) >= 1e15 else str(value)


# How many backups retention keeps, here and on the host. Never 0: retention must never
# remove the backup it has just taken.
KEEP = Limit("keep", 1, 10000)
# `logs --tail N`.
TAIL = Limit("tail", 0, 1_000_000)
PORT = Limit("port", 1, 65535)
# Seconds. A timeout must be finite: .nan, .inf and 1e30 mean "wait forever" or crash.
CONNECT_TIMEOUT = Limit("connect_timeout", 0.1, 3600, integer=False)
COMMAND_TIMEOUT = Limit("command_timeout", 1, 7 * 24 * 3600, integer=False)
# `history -n N`.
HISTORY = Limit("n", 1, 10000)
# `--lock-wait SECONDS`: at most a day; a run that waits longer is forgotten, not waiting.
LOCK_WAIT = Limit("lock-wait", 0, 86400)
