"""What ``Frontend.pump`` (frontend.py) stops on, as its owner acts on it. No I/O."""

from __future__ import annotations

from enum import IntEnum
from typing import Final

__all__ = ["HOLD", "IDLE", "NEED_SERVER", "TERMINATE", "Pump"]


class Pump(IntEnum):
    """What ``Frontend.pump`` stopped on."""

    IDLE = 0  # everything complete was handled
    NEED_SERVER = 1  # a segment starts and no server is attached
    HOLD = 2  # waiting for in-flight replies before the next segment can be judged
    TERMINATE = 3  # the client sent Terminate


IDLE: Final = Pump.IDLE
NEED_SERVER: Final = Pump.NEED_SERVER
HOLD: Final = Pump.HOLD
TERMINATE: Final = Pump.TERMINATE
