"""What every CLI job returns.

A job is a plain function ``run(cfg, out_dir) -> JobResult | None`` taking its config
dataclass and the directory it may write into. The CLI saves ``summary`` as JSON when the
user passes ``--json PATH`` and exits with ``exit_code``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class JobResult:
    summary: dict[str, Any] = field(default_factory=dict)
    # 0 success; 1 the job ran and found a problem (e.g. a store that fails verification).
    exit_code: int = 0
