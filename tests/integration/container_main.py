"""What a Modal container runs before it takes traffic (``modal_service.app.start_server``), here on the
CPU with the local model and without snapshots (vLLM's sleep mode needs a GPU): the app served from a
background thread, the engine started on that thread's loop and warmed through the port. For
test_modal_container.py: prints ``READY <json>`` once started, serves until stdin closes, then stops
and prints ``STOPPED <engine state>``.

    python -m tests.integration.container_main MODEL_DIR PORT API_KEY
"""

from __future__ import annotations

import json
import sys

if __name__ == "__main__":  # vLLM spawns its engine process, which imports this module again
    from modal_service.app import load_config, start_server
    from modal_service.engine.engine import Engine, EngineConfig

    model, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    config = load_config({"ANANKE_MODEL": model, "ANANKE_SNAPSHOT": "0", "ANANKE_MAX_MODEL_LEN": "2048"})
    # The Modal engine settings are GPU ones (compiled, a share of GPU memory); the CPU gets the
    # local service's: eager, a fixed KV cache.
    engine = Engine(EngineConfig(model=model, max_model_len=2048, kv_cache_memory_bytes=1 << 28))
    server = start_server(config, key, engine=engine, port=port, timeout_s=600)
    print("READY", json.dumps({"state": engine.state, "start_seconds": engine.start_seconds}), flush=True)
    sys.stdin.read()
    server.stop()
    print("STOPPED", engine.state, flush=True)
