import pytest

from pipeline.srt import Cue, SrtError, format_srt, parse_srt


def test_round_trip_keeps_milliseconds():
    cues = [Cue(0.475, 2.81, "Hello there."), Cue(3601.002, 3605.5, "An hour later.")]
    text = format_srt(cues)
    assert "01:00:01,002 --> 01:00:05,500" in text
    assert parse_srt(text) == cues


def test_tolerates_bom_crlf_dots_and_missing_index():
    text = "\ufeff1\r\n00:00:01.5 --> 00:00:02,250\r\nfirst\r\nline\r\n\r\n00:00:03,000 --> 00:00:04,000\r\nsecond\r\n"
    assert parse_srt(text) == [Cue(1.5, 2.25, "first line"), Cue(3.0, 4.0, "second")]


def test_errors_name_the_cue():
    with pytest.raises(SrtError, match="cue 2: no"):
        parse_srt("1\n00:00:01,000 --> 00:00:02,000\na\n\n2\nnot a time\nb\n")
    with pytest.raises(SrtError, match="cue 1: ends"):
        parse_srt("1\n00:00:03,000 --> 00:00:02,000\na\n")
