#!/usr/bin/env bash
# The raw HTTP API with curl, for clients in any language (full reference: docs/api.md).
#
#   ANANKE_BASE_URL  service URL (default http://127.0.0.1:8000; a Modal URL works the same)
#   ANANKE_API_KEY   sent as "Authorization: Bearer ..." when set
#
# Each call prints a "## ..." line and then the response body (JSON, or SSE "data:" lines).
# Start a service first (`ananke serve`); this script does not start one.
set -euo pipefail

BASE_URL="${ANANKE_BASE_URL:-http://127.0.0.1:8000}"
BASE_URL="${BASE_URL%/}"
AUTH=()
if [[ -n "${ANANKE_API_KEY:-}" ]]; then
  AUTH=(-H "Authorization: Bearer ${ANANKE_API_KEY}")
fi

post() {  # post JSON_BODY [extra curl args...]
  local body="$1"
  shift
  curl -sS --fail-with-body ${AUTH[@]+"${AUTH[@]}"} -H "Content-Type: application/json" \
    -X POST "${BASE_URL}/generate_api" -d "${body}" "$@"
  echo
}

# 1. Health: {"status": "ok", "model": ...} once the engine is loaded (503 "loading" before).
echo "## GET /health"
curl -sS --fail-with-body "${BASE_URL}/health"
echo

# 2. JSON Schema. "messages" applies the model's chat template on the server. The answer carries
#    generated_text (the JSON as a string), constraint_satisfied (the service's independent re-check)
#    and finish_reason ("length" means max_tokens cut it short: then constraint_satisfied is false).
echo "## POST /generate_api json_schema"
post '{
  "messages": [{"role": "user", "content": "Extract the person: Maria Lopez is 34 and lives in Lisbon."}],
  "constraints": {"json_schema": {
    "type": "object",
    "properties": {
      "name": {"type": "string", "maxLength": 30},
      "age": {"type": "integer", "minimum": 0, "maximum": 150}
    },
    "required": ["name", "age"],
    "additionalProperties": false
  }},
  "max_tokens": 48,
  "temperature": 0
}'

# 3. Regex, with a raw "prompt" (no chat template) as the original service took it. The output fully
#    matches the pattern. Use [0-9], not \d (llguidance's \d is Unicode).
echo "## POST /generate_api regex"
post '{
  "prompt": "The support line is ",
  "constraints": {"regex": "[0-9]{3}-[0-9]{3}-[0-9]{4}"},
  "max_tokens": 16,
  "temperature": 0
}'

# 4. Streaming: Server-Sent Events. "token" frames carry text deltas; the last frame is "done" with
#    the whole response (or "error"). -N turns off curl's buffering so frames print as they arrive.
echo "## POST /generate_api stream"
post '{
  "messages": [{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
  "constraints": {"choice": ["yes", "no"]},
  "max_tokens": 4,
  "temperature": 0,
  "stream": true
}' -N
