"""The pool benchmark's traffic and text helpers."""

from __future__ import annotations

from collections import Counter

from bench.pool import PROMPTS_PER_FILE, split_file, zipf_prompts


def test_zipf_traffic_is_seeded_and_long_tailed():
    prompts = [f"prompt {i}" for i in range(100)]
    drawn = zipf_prompts(prompts, 2000, seed=3)
    assert drawn == zipf_prompts(prompts, 2000, seed=3)
    counts = Counter(drawn).most_common()
    assert counts[0][1] > 10 * counts[len(counts) // 2][1]  # a popular head, a long tail
    assert len(counts) > 50  # most prompts still come up


def test_a_file_is_split_into_training_text_and_held_out_prompts():
    text = "".join(f"line {i}: some words here\n" for i in range(400))
    train, prompts = split_file(text)
    assert len(prompts) == PROMPTS_PER_FILE
    assert text.startswith(train) and all(p in text[len(train) :] for p in prompts)
