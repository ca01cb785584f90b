"""docs/tutorial.md: its plugin and config, loaded from docs/examples, give the replies it shows."""

from __future__ import annotations

import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

from myplugins.test_sender_policy import SenderPolicyTests  # noqa: E402

__all__ = ["SenderPolicyTests"]
