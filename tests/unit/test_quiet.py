"""`--quiet`: no progress bars, the libraries' included."""

from __future__ import annotations

from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from serve_app.cli import main


def test_quiet_also_silences_transformers_weight_loading_bar(smoke_library, capsys):
    model = smoke_library.parent / "experts" / "gen-s"
    AutoModelForCausalLM.from_pretrained(model)
    assert "Loading weights" in capsys.readouterr().err  # what a user would otherwise see
    try:
        # Any command's --quiet; this one fails at once on its missing data, after parsing.
        code = main(["evaluate", "--library", str(smoke_library), "--quiet"])
        code_err = capsys.readouterr().err
        AutoModelForCausalLM.from_pretrained(model)
        assert "Loading weights" not in capsys.readouterr().err
    finally:
        hf_logging.enable_progress_bar()  # other tests' state as it was
    assert code == 2 and "--profile" in code_err, code_err
