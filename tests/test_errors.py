"""`maml.errors`: how another library's error is quoted inside one of ours (`gist`), and how a
command ends (`exit_status`)."""

import signal

import pytest

from maml.errors import Stopped, UsageError, exit_status, gist


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


def fail(exc: BaseException):
    def run():
        raise exc
    return run


@pytest.mark.parametrize("local_rank, printed", [("0", True), ("1", False)])
def test_a_machine_s_own_errors_are_said_once_per_machine(monkeypatch, capsys, local_rank,
                                                          printed):
    """Under torchrun the processes of one machine share its files and its Ctrl-C: the first
    process alone says so; every process still ends with the status."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    cases = [(OSError(28, "No space left on device"), 1, "error: No space left on device"),
             (KeyboardInterrupt(), 130, "stopped: interrupted (Ctrl-C)"),
             (UsageError("bad"), 2, "error: bad")]
    for exc, status, line in cases:
        assert exit_status(fail(exc)) == status
        err = capsys.readouterr().err
        assert (err.startswith(line) if printed else err == ""), err


def test_an_error_raised_on_the_way_out_of_a_stop_is_reported_as_the_stop(capsys):
    """A SIGTERM that landed inside torch's bookkeeping of function modes left its stack half
    popped; leaving the mode then raised a RuntimeError, and the export ended with a traceback
    and status 1 instead of one `stopped:` line and 143."""
    def sigterm_then_torch_fails():
        try:
            raise Stopped("terminated (SIGTERM)", signal.SIGTERM)
        finally:
            raise RuntimeError("trying to pop from empty mode stack")

    assert exit_status(sigterm_then_torch_fails) == 143
    assert capsys.readouterr().err == "stopped: terminated (SIGTERM)\n"

    def ctrl_c_then_two_errors():
        try:
            try:
                raise KeyboardInterrupt
            finally:
                raise OSError(28, "No space left on device")
        finally:
            raise ValueError("and another")

    assert exit_status(ctrl_c_then_two_errors) == 130
    assert capsys.readouterr().err == "stopped: interrupted (Ctrl-C)\n"
    with pytest.raises(RuntimeError, match="a bug"):  # no stop behind it: a real error
        exit_status(fail(RuntimeError("a bug")))
