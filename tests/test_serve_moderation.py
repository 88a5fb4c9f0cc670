"""The safety filter and the text a reply releases: stop strings, split characters and flagged words never leak."""
import asyncio

import pytest

from llmnb.serve.streaming import ReplyText
from llmnb.serve.moderation import Batched, ProfanityFilter, make_filter
from llmnb.serve.scheduler import Token


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from llmnb.assets import prepare_tiny_chat

    return AutoTokenizer.from_pretrained(prepare_tiny_chat())


class Stub:
    """What ReplyText reads of the server: a real tokenizer's decode and the filter."""

    def __init__(self, tokenizer, check=None):
        self.tokenizer, self.filter = tokenizer, Batched(check) if check is not None else None

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def release(tokenizer, text: str, stops=(), check=None, last: str | None = None) -> tuple[list[str], str | None]:
    """Feed `text` token by token (the last one carrying `last` as its finish); the pieces released and the finish."""
    async def feed():
        reply = ReplyText(Stub(tokenizer, check), list(stops))
        ids = tokenizer.encode(text, add_special_tokens=False)
        pieces = []
        for n, i in enumerate(ids):
            piece, _ = await reply.add(Token(i, -1.0, [], last if n == len(ids) - 1 else None))
            pieces.append(piece)
            if reply.finish:
                break
        return pieces, reply.finish

    return asyncio.run(feed())


def test_the_shipped_classifier_flags_profanity_not_ordinary_text():
    check = ProfanityFilter()
    ordinary, rude = check(["What is the capital of France?", "You are a fucking idiot"])
    assert ordinary < 0.1 and rude > 0.9 and check.threshold == 0.9
    assert check(["well, shit"])[0] >= check.threshold
    assert make_filter("none") is None
    with pytest.raises(ValueError, match="profanity"):
        make_filter("regex")


def test_a_stop_string_split_across_tokens_is_never_released(tokenizer):
    pieces, finish = release(tokenizer, "The answer is 42.\nEND of story", stops=["\nEND"])
    assert "".join(pieces) == "The answer is 42." and finish == "stop"
    assert all("\n" not in p for p in pieces)  # the newline waited until it was clear it begins the stop string


def test_a_character_split_across_tokens_waits_until_whole(tokenizer):
    text = "naïve café 日本"
    pieces, finish = release(tokenizer, text, last="length")
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces) and finish == "length"


def test_a_flagged_word_ends_the_reply_before_it_is_shown(tokenizer):
    pieces, finish = release(tokenizer, "Hello. Well you are a fucking idiot and more", check=ProfanityFilter())
    shown = "".join(pieces)
    assert finish == "content_filter" and "fuck" not in shown and shown == "Hello. "  # the sentence before was judged clean
    text = "Well you are a kind person, and the sea is calm today. Goodbye"
    clean, finish = release(tokenizer, text, check=ProfanityFilter(), last="length")
    assert "".join(clean) == text and finish == "length"
    assert 2 <= sum(bool(p) for p in clean) <= 4  # judged (and released) a phrase or a sentence at a time, not per token


def test_texts_judged_in_one_turn_of_the_event_loop_share_one_classifier_call():
    calls = []

    class Counting(ProfanityFilter):
        def __call__(self, texts):
            calls.append(len(texts))
            return super().__call__(texts)

    batched = Batched(Counting())

    async def many():
        return await asyncio.gather(*(batched.flagged(t) for t in ["hello there", "what a shit day", "nice weather", "fuck off"]))

    assert asyncio.run(many()) == [False, True, False, True]
    assert calls == [4]
