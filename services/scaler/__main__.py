"""`python -m services.scaler`: run the KEDA external scaler (configured by ELASTUNE_* variables)."""

from __future__ import annotations

import asyncio

from ..common.config import from_env
from ..common.logging import configure_logging
from .config import ScalerConfig
from .server import main

if __name__ == "__main__":
    configure_logging("scaler")
    asyncio.run(main(from_env(ScalerConfig)))
