"""`maml.errors.gist`: how another library's error is quoted inside one of ours."""

from maml.errors import gist


def test_gist_is_the_first_non_empty_line():
    exc = RuntimeError("\n  first line  \nsecond line\nthird")
    assert gist(exc) == "first line"
    assert gist(exc, lines=2) == "first line second line"
    assert gist(exc, typed=True) == "RuntimeError: first line"


def test_gist_of_a_message_less_exception_is_its_type_name():
    assert gist(ValueError()) == "ValueError"
    assert gist(ValueError("  \n ")) == "ValueError"
    assert gist(ValueError(), typed=True) == "ValueError"


def test_gist_cuts_long_messages_at_a_word():
    words = " ".join(f"word{i:03d}" for i in range(100))  # 799 characters
    text = gist(RuntimeError(words), limit=60)
    assert len(text) <= 60 and text.endswith("...")
    kept = text[:-3].split(" ")
    assert kept == words.split(" ")[:len(kept)]  # whole words only, in order
    assert len(kept) >= 5


def test_gist_cuts_a_single_long_token_at_the_limit():
    text = gist(RuntimeError("x" * 500), limit=50)
    assert text == "x" * 47 + "..."


def test_gist_keeps_a_message_that_fits():
    assert gist(RuntimeError("a" * 50), limit=50) == "a" * 50
