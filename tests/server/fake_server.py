"""Run the real CLI and uvicorn over the FakeEngine (for end-to-end tests of the HTTP layer
that do not need the model): `python tests/server/fake_server.py [drlora-serve flags]`.
Extra env: FAKE_DELAY (seconds per token), FAKE_MAX_MODEL_LEN, FAKE_START_DELAY (seconds the
engine takes to start), FAKE_START_ERROR (the engine fails to start with this message)."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from fake_engine import FakeEngine  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from drlora.models import resolve_model  # noqa: E402
from server.cli import main  # noqa: E402


def factory(engine_args):
    tok = AutoTokenizer.from_pretrained(resolve_model(engine_args.model))
    return FakeEngine(tok, model_name=engine_args.served_model_name or engine_args.model,
                      max_model_len=int(os.environ.get("FAKE_MAX_MODEL_LEN", "128")),
                      delay=float(os.environ.get("FAKE_DELAY", "0")),
                      start_delay=float(os.environ.get("FAKE_START_DELAY", "0")),
                      start_error=os.environ.get("FAKE_START_ERROR"))


if __name__ == "__main__":
    main(sys.argv[1:], engine_factory=factory)
