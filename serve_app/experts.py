"""Expert engines: load a Hugging Face model, generate, fill masks, and score in bits per byte.

Bits per byte (bpb) makes losses comparable across tokenizers: a loss per token depends on how
much text a token covers, a loss per byte does not.

* Causal LM (text-generation). The text's tokens t_1..t_n follow a start token t_0 (the
  tokenizer's BOS, else its EOS), so every token of the text is predicted:
      bpb = -sum_{i=1..n} log2 p(t_i | t_0..t_{i-1}) / bytes
* Masked LM (fill-mask). Pseudo-log-likelihood (Salazar et al., 2020): each token is masked in
  turn and predicted from all the others:
      bpb = -sum_{i=1..n} log2 p(t_i | t_1..t_{i-1}, [MASK], t_{i+1}..t_n) / bytes
  PLL is not a normalised distribution over texts, so a masked expert's bpb ranks masked
  experts well but is only roughly comparable with a causal expert's.

`bytes` is the length in UTF-8 bytes of the text the counted tokens cover: the whole text, or
its prefix up to the last token kept when the text is longer than the model's context.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from serve_app.answers import MASK_MARKERS, Filled, Generation, Score, StopText, stop_at, whole

LN2 = math.log(2.0)
#: Temperatures below this sample as greedy: dividing logits by a tiny temperature overflows.
MIN_TEMPERATURE = 0.01


def pick_device() -> torch.device:
    """The device torch sees, whatever Ray was asked for."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def context_length(model: Any) -> int:
    """Positions the model can attend to (a multimodal model's text model's)."""
    cfg = model.config.get_text_config()
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1024


class HFExpert:
    """A Hugging Face model as an expert. Weights load only from safetensors, no remote code."""

    def __init__(
        self,
        model: str,
        task: str,
        device: torch.device | None = None,
        revision: str | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

        self.task = task
        self.device = device or pick_device()
        pinned = {"revision": revision} if revision else {}  # a Hub model at a fixed commit
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False, **pinned)
        cls = AutoModelForCausalLM if task == "text-generation" else AutoModelForMaskedLM
        self.model = cls.from_pretrained(
            model, use_safetensors=True, trust_remote_code=False, **pinned
        )
        self.model.to(self.device).eval()
        self.max_length = min(context_length(self.model), 4096)
        # A fast tokenizer keeps its truncation and padding settings in itself and sets them on
        # each call: calls from two threads (a stream's and a batch's) would encode with each
        # other's settings. Every encoding of this expert takes this lock.
        self._tokenizing = threading.Lock()
        # Where an answer ends: the tokenizer's EOS and every end id the model's generation
        # config names (an instruct model's end-of-turn), as model.generate stops on them.
        ends = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ends = ends if isinstance(ends, list) else [ends]
        self.end_ids = {i for i in [self.tokenizer.eos_token_id, *ends] if i is not None}
        # A prompt longer than the context keeps its end: that is what a continuation follows.
        self.tokenizer.truncation_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        if task == "fill-mask" and self.tokenizer.mask_token_id is None:
            raise ValueError(f"{model}: a fill-mask expert needs a tokenizer with a mask token")

    # --- scoring ----------------------------------------------------------------------------

    def _encode(self, text: str, budget: int) -> tuple[list[int], int]:
        """Token ids of `text` (no special tokens), cut to `budget`, and the bytes they cover."""
        enc = self.tokenize(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        if len(ids) <= budget:
            return ids, len(text.encode("utf-8"))
        ids = ids[:budget]
        return ids, len(text[: offsets[budget - 1][1]].encode("utf-8"))

    @torch.no_grad()
    def score(self, texts: list[str]) -> list[Score]:
        """Loss of each text in bits per byte (see the module docstring for the definition)."""
        if self.task == "text-generation":
            return self._score_causal(texts)
        return [self._score_masked(t) for t in texts]

    def _score_causal(self, texts: list[str], budget: int = 1 << 25) -> list[Score]:
        """Batched: texts of similar length share a padded batch of at most `budget` logits."""
        tok = self.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        assert start is not None, "a causal tokenizer needs a BOS or EOS token to start from"
        encoded = [self._encode(t, self.max_length - 1) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: len(encoded[i][0]))
        vocab = int(self.model.config.get_text_config().vocab_size)
        scores: list[Score | None] = [None] * len(texts)
        for group in _groups(order, lambda j: (len(encoded[j][0]) + 1) * vocab, budget):
            width = len(encoded[group[-1]][0]) + 1  # sorted: the last is the longest
            x = torch.full((len(group), width), start, device=self.device)  # (B, T+1)
            mask = torch.zeros_like(x)
            for b, j in enumerate(group):
                ids = encoded[j][0]
                x[b, : len(ids) + 1] = torch.tensor([start, *ids])
                mask[b, : len(ids) + 1] = 1
            logits = self.model(input_ids=x, attention_mask=mask).logits[:, :-1].float()
            logp = F.log_softmax(logits, dim=-1).gather(-1, x[:, 1:, None])[..., 0]  # (B, T)
            bits = -(logp * mask[:, 1:]).sum(1) / LN2  # (B,): padding counts nothing
            for b, j in enumerate(group):
                ids, nbytes = encoded[j]
                scores[j] = Score(bits=float(bits[b]), bytes=nbytes, tokens=len(ids))
        return scores  # type: ignore[return-value]

    def _score_masked(self, text: str, chunk: int = 64) -> Score:
        tok = self.tokenizer
        ids, nbytes = self._encode(text, self.max_length - 2)
        first = [tok.cls_token_id] if tok.cls_token_id is not None else []
        last = [tok.sep_token_id] if tok.sep_token_id is not None else []
        x = torch.tensor([*first, *ids, *last], device=self.device)  # (T,)
        first = len(first)
        positions = torch.arange(first, first + len(ids), device=self.device)  # (n,)
        bits = 0.0
        for part in positions.split(chunk):
            batch = x.repeat(len(part), 1)  # (b, T): one copy per masked position
            batch[torch.arange(len(part)), part] = tok.mask_token_id
            logits = self.model(input_ids=batch).logits.float()  # (b, T, V)
            picked = logits[torch.arange(len(part)), part]  # (b, V)
            logp = F.log_softmax(picked, dim=-1).gather(-1, x[part][:, None])  # (b, 1)
            bits += float(-logp.sum() / LN2)
        return Score(bits=bits, bytes=nbytes, tokens=len(ids))

    def tokenize(self, *args: Any, **kwargs: Any) -> Any:
        """The tokenizer's encoding, one thread at a time (see __init__)."""
        with self._tokenizing:
            return self.tokenizer(*args, **kwargs)

    # --- serving ----------------------------------------------------------------------------

    def new_tokens(self, asked: int, prompt_tokens: int = 1) -> int:
        """New tokens a request may have: what it asked, less whatever does not fit beside
        the prompt, where the prompt keeps at least half the context (or all of itself)."""
        keep = max(1, min(prompt_tokens, self.max_length // 2))
        return max(1, min(asked, self.max_length - keep))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | list[int] = 0,
        stop: tuple[str, ...] = (),
        deadline: float | list[float | None] | None = None,
        chat: bool = False,
    ) -> list[Generation]:
        """Continue each prompt; greedy unless temperature >= MIN_TEMPERATURE (then seeded
        sampling, the same for a prompt alone or in any batch: SeededSampling). Prompt and new
        tokens always fit the context: each prompt's max_new_tokens is clamped to what fits
        beside it (the prompt keeps at least half the context), never to what fits beside
        another prompt of the batch, and a prompt longer than the rest keeps its last tokens.
        An answer ends before the first of the `stop` strings. Generation stops where it is at
        `deadline` (time.time(); one for every prompt, or one each: a row stops at its own),
        as a request that timed out needs no more tokens. `chat`:
        the prompts were rendered by the chat template, which writes its own special tokens
        (a BOS among them), so none are added. `seed`: one for every prompt, or one each."""
        special = not chat
        seeds = seed if isinstance(seed, list) else [seed] * len(prompts)
        deadlines = deadline if isinstance(deadline, list) else [deadline] * len(prompts)
        lengths = self.tokenize(
            prompts, truncation=True, max_length=self.max_length, add_special_tokens=special
        )["input_ids"]
        caps = [self.new_tokens(max_new_tokens, len(ids)) for ids in lengths]
        out: list[Generation | None] = [None] * len(prompts)
        for cap in sorted(set(caps)):  # prompts that may have as many new tokens run together
            idx = [i for i, c in enumerate(caps) if c == cap]
            answers = self._generate(
                [prompts[i] for i in idx],
                cap,
                temperature,
                top_p,
                [seeds[i] for i in idx],
                stop,
                [deadlines[i] for i in idx],
                special,
            )
            for i, answer in zip(idx, answers, strict=True):
                out[i] = answer
        return out  # type: ignore[return-value]

    def _generate(
        self,
        prompts: list[str],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int],
        stop: tuple[str, ...],
        deadlines: list[float | None],
        special: bool,
    ) -> list[Generation]:
        """One padded batch of prompts that fit the context beside max_new_tokens."""
        enc = self.tokenize(
            prompts,
            return_tensors="pt",
            padding=True,
            padding_side="left",
            truncation=True,
            max_length=self.max_length - max_new_tokens,
            add_special_tokens=special,
        ).to(self.device)
        start = enc["input_ids"].shape[1]
        ended: dict[int, int] = {}  # row -> new tokens when a stop string ended it
        late: dict[int, int] = {}  # row -> new tokens when its deadline stopped it
        stopping = _until(deadlines, None, start, stop, self.tokenizer, ended, late)
        out = self._run(enc, max_new_tokens, temperature, top_p, seeds, stopping)
        new = out[:, start:]  # (B, new)
        return [
            self._answer(row, int(mask.sum()), stop, max_new_tokens, ended.get(b), late.get(b))
            for b, (row, mask) in enumerate(zip(new.tolist(), enc["attention_mask"], strict=True))
        ]

    def _answer(
        self,
        row: list[int],
        prompt_tokens: int,
        stop: tuple[str, ...],
        max_new_tokens: int,
        ended: int | None = None,
        late: int | None = None,
    ) -> Generation:
        """One generated row as an answer: up to its first end id (self.end_ids), or its first
        `ended` tokens where a stop string ended it (the batch goes on padding it), the text
        cut before that string, or its first `late` tokens where its deadline stopped it (an
        answer cut short: finish reason "length")."""
        tok = self.tokenizer
        end = next((i for i, t in enumerate(row) if t in self.end_ids), len(row))
        end = end if ended is None else min(end, ended)
        stopped = end < len(row)
        if late is not None and late < end:
            end, stopped = late, False
        kept = row[:end]
        text = tok.decode(kept, skip_special_tokens=True)
        cut = stop_at(text, stop)
        return Generation(
            text=whole(text) if cut is None else text[:cut],
            prompt_tokens=prompt_tokens,
            completion_tokens=len(kept),
            finish_reason="stop" if stopped or cut is not None else "length",
            max_new_tokens=max_new_tokens,
        )

    @torch.no_grad()
    def _run(
        self,
        enc: Any,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seeds: list[int],
        stopping: Any,
        streamer: Any = None,
    ) -> torch.Tensor:
        """model.generate: greedy, or from MIN_TEMPERATURE up sampling with a generator of its
        own per row (SeededSampling, `seeds` one a row), which picks the token greedy decoding
        then takes. One beam, whatever the model's generation config says: a row is one
        answer."""
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList()
        if temperature >= MIN_TEMPERATURE:
            processors.append(SeededSampling(seeds, temperature, top_p, self.device))
        return self.model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            num_return_sequences=1,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            streamer=streamer,
            stopping_criteria=stopping,
            logits_processor=processors,
        )

    def stream(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: tuple[str, ...] = (),
        deadline: float | None = None,
        cancel: threading.Event | None = None,
        chat: bool = False,
    ) -> Iterator[str | Generation]:
        """Continue one prompt as `generate` does, yielding text as it is decoded (transformers'
        TextIteratorStreamer; text that may begin a stop string is held back until it does
        not), then the whole answer as a Generation (for usage). Setting `cancel` ends the
        generation at the next token."""
        tok = self.tokenizer
        special = not chat
        length = len(
            self.tokenize(
                prompt, truncation=True, max_length=self.max_length, add_special_tokens=special
            )["input_ids"]
        )
        max_new_tokens = self.new_tokens(max_new_tokens, length)
        enc = self.tokenize(
            [prompt],
            return_tensors="pt",
            truncation=True,
            max_length=self.max_length - max_new_tokens,
            add_special_tokens=special,
        ).to(self.device)
        streamer = _token_streamer(tok)
        done: dict[str, Any] = {}
        start = enc["input_ids"].shape[1]
        cancel = cancel if cancel is not None else threading.Event()
        ended: dict[int, int] = {}
        stopping = _until([deadline], cancel, start, stop, tok, ended, {})

        def run() -> None:
            try:
                done["out"] = self._run(
                    enc, max_new_tokens, temperature, top_p, [seed], stopping, streamer
                )
            except Exception as err:  # handed to the caller below, after the stream ends
                done["error"] = err
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        cut = StopText(stop)
        try:
            for text in streamer:
                if text := cut.feed(text):
                    yield text
                if cut.done:  # were the stopping criterion to miss it, stop here all the same
                    cancel.set()
            if text := cut.flush():
                yield text
        finally:
            if worker.is_alive():
                cancel.set()
            worker.join()
        if "error" in done:
            raise done["error"]
        row = done["out"][0, start:].tolist()
        prompt_tokens = int(enc["attention_mask"].sum())
        yield self._answer(row, prompt_tokens, stop, max_new_tokens, ended.get(0))

    @torch.no_grad()
    def fill_mask(self, prompts: list[str], top_k: int = 5) -> list[Filled]:
        """Top predictions for every mask in each prompt, and the prompt filled with the best."""
        tok = self.tokenizer
        texts = [MASK_MARKERS.sub(tok.mask_token, p) for p in prompts]
        enc = self.tokenize(
            texts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_length
        ).to(self.device)
        logits = self.model(**enc).logits.float()  # (B, T, V)
        # A mask is filled with text, never [MASK] or [SEP]: scores are probabilities over the
        # vocabulary without its special tokens.
        logits[..., special_ids(tok)] = float("-inf")
        probs = logits.softmax(-1)  # (B, T, V)
        results = []
        for b, text in enumerate(texts):
            where = (enc["input_ids"][b] == tok.mask_token_id).nonzero().flatten().tolist()
            masks = []
            for pos in where:
                p, ids = probs[b, pos].topk(top_k)
                masks.append(
                    [
                        {"token": tok.decode([i]).strip(), "score": round(float(s), 6)}
                        for s, i in zip(p.tolist(), ids.tolist(), strict=True)
                    ]
                )
            # A prompt longer than the context keeps its end, so the masks it lost are its first
            # ones: they stay as they are, and the predictions fill the last.
            parts = text.split(tok.mask_token)
            best = [choices[0]["token"] for choices in masks]
            best = [tok.mask_token] * (len(parts) - 1 - len(best)) + best
            filled = parts[0] + "".join(b + p for b, p in zip(best, parts[1:], strict=True))
            results.append(Filled(text=filled, masks=masks))
        return results


class SeededSampling:
    """Sampling as a logits processor: temperature, then top-p, then one token drawn per row
    from a generator of its own seeded with the request's seed; every other token gets -inf,
    so greedy decoding takes the drawn one. torch's global generator is shared by every
    thread of the replica and by the rows of a batch, so seeding it gave a request a
    different answer beside other requests; with a generator per row the same request gives
    the same answer alone, in any batch, beside any other generation."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float, device: Any):
        self.temperature, self.top_p = temperature, top_p
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        assert scores.shape[0] == len(self.generators), "one generator a row (one beam a row)"
        logits = scores.float() / self.temperature  # (B, V)
        if self.top_p < 1.0:  # the fewest most likely tokens that hold top_p of the mass
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            beyond = probs.cumsum(-1) - probs >= self.top_p
            beyond[:, 0] = False  # the most likely token always stays (top_p 0: greedy)
            ordered = ordered.masked_fill(beyond, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, order, ordered)
        probs = logits.softmax(-1)
        picks = torch.cat(
            [torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(self.generators)]
        )  # (B,)
        return torch.full_like(scores, float("-inf")).scatter_(1, picks[:, None], 0.0)


def _token_streamer(tokenizer: Any) -> Any:
    """transformers' TextIteratorStreamer, but handing out text token by token: the stock one
    waits for a space, so a word-less answer would arrive in one piece. Text that ends inside a
    character (a byte-level token holding half of it) waits for the rest, and is dropped where
    the answer ends before the rest (as `HFExpert._answer` drops it)."""
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value: torch.Tensor) -> None:
            if value.dim() > 1:
                value = value[0]
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):
                return
            printable, self.print_len = text[self.print_len :], len(text)
            self.on_finalized_text(printable)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            super().on_finalized_text(whole(text) if stream_end else text, stream_end)

    return TokenStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _until(
    deadlines: list[float | None],
    cancel: threading.Event | None,
    start: int,
    stop: tuple[str, ...],
    tokenizer: Any,
    ended: dict[int, int],
    late: dict[int, int],
) -> Any:
    """Stopping criteria: a row ends once its deadline (`deadlines`, time.time(), one a row)
    has passed, and `late` records how many new tokens (those from position `start`) it had
    then; every row ends once `cancel` is set (the client went away); a row ends once its new
    tokens hold one of the `stop` strings, and `ended` records how many it had then.
    transformers' own stop_strings are not used: they match across the prompt's end, where
    OpenAI's stop looks at the answer alone."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            now, gone = time.time(), cancel is not None and cancel.is_set()
            over = [gone or (d is not None and now > d) for d in deadlines]
            for b in (b for b, o in enumerate(over) if o and b not in late):
                late[b] = input_ids.shape[1] - start
            return torch.tensor(over, dtype=torch.bool, device=input_ids.device)

    # Only the last tokens are decoded each step: a stop string of n characters lies within
    # the last 4n + 1 when each token holds a byte or more of its text (a character is at most
    # four). Where tokens hold less, a row may run on; its answer is still cut (_answer).
    window = 4 * max((len(s) for s in stop), default=0) + 1

    class StopStrings(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
            rows = [b for b in range(input_ids.shape[0]) if b not in ended]
            tails = input_ids[rows, max(start, input_ids.shape[1] - window) :].tolist()
            texts = tokenizer.batch_decode(tails, skip_special_tokens=True)
            for b, text in zip(rows, texts, strict=True):
                if stop_at(text, stop) is not None:
                    ended[b] = input_ids.shape[1] - start
            found = [b in ended for b in range(input_ids.shape[0])]
            return torch.tensor(found, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Deadline(), *([StopStrings()] if stop else [])])


def _groups(order: list[int], cost: Callable[[int], int], budget: int) -> list[list[int]]:
    """Cut items sorted by size into batches whose size times length stays within `budget`."""
    groups: list[list[int]] = []
    for j in order:
        if groups and (len(groups[-1]) + 1) * cost(j) <= budget:
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups


#: Between the first character of special-token text written in a message and the rest, so
#: that the text reads the same but no longer tokenizes as the special token.
DEFUSE = "\u200b"


def render_chat(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """A chat as the prompt an expert continues: its tokenizer's own chat template where it
    has one, else a plain transcript ("role: content" lines, then "assistant:").

    Special-token text inside a message (such as `<|im_start|>system`) is defused first: a
    zero-width space after its first character keeps it readable but stops it tokenizing as
    the special token, so message content cannot forge a role or end a turn.
    """
    specials = sorted({t for t in special_tokens(tokenizer) if len(t) > 1}, key=len, reverse=True)
    safe = []
    for m in messages:
        content = m["content"]
        # OpenAI's newer name for the system role; chat templates know only "system".
        role = "system" if m["role"] == "developer" else m["role"]
        for token in specials:
            if token in content:
                content = content.replace(token, token[0] + DEFUSE + token[1:])
        safe.append({"role": role, "content": content})
    if has_template(tokenizer):
        return tokenizer.apply_chat_template(safe, tokenize=False, add_generation_prompt=True)
    return "\n".join([*(f"{m['role']}: {m['content']}" for m in safe), "assistant:"])


def has_template(tokenizer: Any) -> bool:
    """Whether render_chat uses the tokenizer's own chat template (which writes its special
    tokens itself), not a plain transcript."""
    return bool(getattr(tokenizer, "chat_template", None))


def special_tokens(tokenizer: Any) -> list[str]:
    """The text of every special token: registered, or only marked special in the vocabulary."""
    texts = set(tokenizer.all_special_tokens)
    texts.update(str(t) for t in tokenizer.added_tokens_decoder.values() if t.special)
    return sorted(texts)


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of every special token, registered or only marked special in the vocabulary."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if t.special)
    return sorted(ids)


def load_expert(model: str, task: str, revision: str | None = None) -> HFExpert:
    """The default expert loader: a Hugging Face model on the device torch sees."""
    return HFExpert(model, task, revision=revision)
