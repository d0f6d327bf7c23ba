# The obvious verbs. `make quickstart` and `make test` are the README's two commands.
VENV := .venv/bin
.PHONY: setup quickstart serve test test-unit lint type bench bench-quick deploy modal-serve

setup:
	bash scripts/setup.sh

quickstart: setup
	$(VENV)/python examples/quickstart.py

serve:
	$(VENV)/ananke serve

test: setup
	$(VENV)/ruff check .
	$(VENV)/mypy
	$(VENV)/python -m pytest -m "not stress" -q

test-unit:
	$(VENV)/python -m pytest tests/unit -q

lint:
	$(VENV)/ruff check .

type:
	$(VENV)/mypy

bench:
	$(VENV)/python -m bench.run

bench-quick:
	$(VENV)/python -m bench.run --quick

deploy:
	MODAL_MODE=$${MODAL_MODE:-prod} $(VENV)/modal deploy modal_service/app.py

modal-serve:
	$(VENV)/modal serve modal_service/app.py
