"""The constraints layer: compile every kind, re-check outputs, find shortest outputs, close on budget.

- :mod:`.compiler`: the one compile entry point (JSON Schema, regex, grammar, choice, token mask, tool
  turns), cached;
- :mod:`.verify`: the independent re-check that decides ``constraint_satisfied``;
- :mod:`.tools`: the call format, the agent-turn grammar and the call parser;
- :mod:`.schema`: the JSON Schema walkers (shape, depth, finiteness, length caps) and their key table;
- :mod:`.witness`: a small valid instance built from a schema's keywords;
- :mod:`.closing`: the token search that finishes an output cut by ``max_tokens``.
"""
