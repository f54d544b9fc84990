"""A completion's text as the server streams it: stop strings across tokens, text held back while a
stop string may still begin, characters split across tokens."""

from tritongpt2.serve.text import TextStream


class Letters:
    """Token i decodes to PIECES[i]; a piece of "\\ufffd" stands for half a character."""

    PIECES = ["Hel", "lo", " wor", "ld", "!", "\ufffd", "é"]

    def decode(self, ids):
        text = "".join(self.PIECES[i] for i in ids)
        return text.replace("\ufffdé", "é")  # the second half completes the character


def streamed(stops, tokens):
    stream = TextStream(Letters(), stops)
    sent = [stream.add(token) for token in tokens if not stream.stopped]
    return sent, stream


def test_without_stop_strings_each_token_sends_its_text():
    sent, stream = streamed([], [0, 1, 2, 3])
    assert sent == ["Hel", "lo", " wor", "ld"] and stream.finish() == ""


def test_a_stop_string_across_tokens_cuts_the_text_before_it():
    sent, stream = streamed(["o wo"], [0, 1, 2, 3])
    assert sent == ["Hel", "l", ""] and stream.stopped and stream.text == "Hell"


def test_text_that_may_begin_a_stop_string_is_held_back_then_sent():
    sent, stream = streamed(["lox"], [0, 1, 2])
    assert sent == ["He", "l", "lo wor"] and not stream.stopped
    assert stream.finish() == "" and stream.text == "Hello wor"


def test_the_earliest_of_several_stop_strings_wins():
    sent, stream = streamed(["ld", "wor"], [0, 1, 2, 3])
    assert "".join(sent) == "Hello " and stream.stopped


def test_a_character_split_across_tokens_is_sent_whole():
    sent, stream = streamed([], [4, 5, 6])
    assert sent == ["!", "", "é"]


def test_finish_sends_what_was_held_back():
    stream = TextStream(Letters(), ["lx"])
    assert stream.add(0) == "He"
    assert stream.finish() == "l" and stream.text == "Hel"
