"""
C{scripts/soak}, briefly: the command the README and the hostile-input
issue's note rely on for memory numbers must run as documented.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_soakBrieflyWithARelativeInterpreter(tmp_path: Path) -> None:
    """
    Five seconds of the soak's mix, the daemon's interpreter given as a
    path relative to where the command runs (as in C{scripts/soak --python
    .venv/bin/python}): every acknowledged event is in the journal and the
    daemon still serves.
    """
    # This interpreter's environment under a relative name that only
    # resolves from tmp_path.
    (tmp_path / "env").symlink_to(sys.prefix, target_is_directory=True)
    relative = os.path.join("env", os.path.relpath(sys.executable, sys.prefix))
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "soak"),
            "--seconds=5",
            "--max-requests=400",
            "--clients=2",
            "--slowloris=4",
            "--sample=2",
            f"--python={relative}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "soak: OK" in result.stdout
