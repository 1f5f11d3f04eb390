"""The Flower app (FAB) of a federation: its directory and the two components it names.

``ewtune coordinator run`` submits :data:`APP_DIR`. It carries no code, keys, ledgers or data: Flower imports
:data:`SERVER_APP` from the coordinator's installed ewtune and :data:`CLIENT_APP` from each holder's own
installed ewtune (runtime dependency installation is off everywhere). The ClientApp is the coordinator's
code as far as the holder is concerned: it only forwards to the holder's daemon, which enforces the holder's
policy (SECURITY.md, "Parties and what each trusts").
"""

from __future__ import annotations

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent / "flower_app"
SERVER_APP = "ewtune.coordinator.server_app:app"
CLIENT_APP = "ewtune.agent.client_app:app"
RUN_CONFIG_KEY = "federation-config"  # the app config entry naming federation.toml, set by `coordinator run`
