from tokenmill.engines.stopping import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    if not matcher.stopped:
        out += matcher.flush()
    return out, matcher.stopped


def test_no_stops_passes_everything_through():
    assert run((), ["a", "b"]) == ("ab", False)


def test_stop_inside_one_piece_cuts_before_it():
    assert run(("END",), ["hello END world"]) == ("hello ", True)


def test_stop_split_across_pieces_is_found_and_never_emitted():
    matcher = StopMatcher(("###",))
    assert matcher.feed("abc#") == "abc"  # '#' held back: it may start the stop string
    assert matcher.feed("#") == ""
    assert matcher.feed("#tail") == ""
    assert matcher.stopped


def test_partial_match_that_fails_is_released():
    matcher = StopMatcher(("stop",))
    assert matcher.feed("st") == ""
    assert matcher.feed("ar") == "star"
    assert matcher.flush() == ""


def test_earliest_of_several_stops_wins():
    assert run(("b", "a"), ["xxab"]) == ("xx", True)


def test_held_text_is_flushed_at_the_end():
    assert run(("world",), ["hello wor"]) == ("hello wor", False)
