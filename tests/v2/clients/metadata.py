"""Server and model metadata and readiness, printed as JSON."""

from __future__ import annotations

import json

from common import args, client

a = args()
c = client(a)
server = c.get_server_metadata(as_json=True)
out = {
    "live": c.is_server_live(), "ready": c.is_server_ready(),
    "model_ready": {m: c.is_model_ready(m) for m in a["models"] + ["no-such-model"]},
    "server": {"name": server["name"], "version": server["version"], "extensions": server["extensions"]},
    "models": {m: c.get_model_metadata(m, as_json=True) for m in a["models"]},
}
print(json.dumps(out))
