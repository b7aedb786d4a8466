"""Route spec parsing and validation: every accepted form and every documented error."""

import pytest

from tread_fx import Route, RouteSpec, parse_spec


def test_string_forms():
    assert parse_spec("2:8@0.5").routes == (Route(2, 8, 0.5),)
    spec = parse_spec(" 2:4@0.5 , 6:8@0.25 ")
    assert spec.routes == (Route(2, 4, 0.5), Route(6, 8, 0.25))
    assert parse_spec("-10:-4@0").routes == (Route(-10, -4, 0.0),)
    assert str(parse_spec("2:8@0.5")) == "2:8@0.5"


def test_dict_forms_of_other_trainers():
    spec = parse_spec([{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 8}])
    assert spec.routes == (Route(2, 8, 0.5),)
    spec = parse_spec({"routes": [{"selection_ratio": 0.5, "start": 1, "end": 3}],
                       "keep_order": False, "seed": 3})
    assert spec.routes == (Route(1, 3, 0.5),) and spec.keep_order is False and spec.seed == 3


def test_objects_and_overrides():
    spec = parse_spec(Route(2, 8, 0.5), seed=7, keep_order=False, blocks="blocks")
    assert spec == RouteSpec((Route(2, 8, 0.5),), keep_order=False, seed=7, blocks="blocks")
    assert parse_spec(spec).routes == spec.routes
    assert parse_spec([Route(0, 1, 0.1), "3:4@0.2"]).routes[1] == Route(3, 4, 0.2)


@pytest.mark.parametrize("spec, message", [
    ("2-8@0.5", r"route 0 \('2-8@0.5'\): expected 'start:end@selection_ratio'"),
    ("2:8@1.0", r"route 0 .*selection_ratio=1.0 is outside \[0, 1\)"),
    ("2:8@-0.1", r"selection_ratio=-0.1 is outside \[0, 1\)"),
    ("1:2@0.5,x", r"route 1 \('x'\)"),
    ([{"selection_ratio": 0.5, "start_layer_idx": 2}], r"route 0 .*missing field 'end_layer_idx'"),
    ([{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 3, "rate": 1}],
     r"unknown field\(s\) \['rate'\]"),
    ([{"selection_ratio": True, "start_layer_idx": 2, "end_layer_idx": 3}],
     r"selection_ratio must be a number"),
    ([{"selection_ratio": 0.5, "start_layer_idx": 2.0, "end_layer_idx": 3}],
     r"start_layer_idx must be an integer"),
    ("", r"has no routes"),
    ([], r"has no routes"),
])
def test_parse_errors_name_route_and_field(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec)


def test_bad_options():
    with pytest.raises(ValueError, match="keep_order must be True or False"):
        parse_spec("1:2@0.5", keep_order="yes")
    with pytest.raises(ValueError, match="seed must be an int"):
        parse_spec("1:2@0.5", seed=1.5)
    with pytest.raises(TypeError, match="expected a string"):
        parse_spec(42)


def test_resolve_negative_indices():
    spec = parse_spec("2:-5@0.5,-3:-1@0.25").resolve(12)
    assert spec.routes == (Route(2, 7, 0.5), Route(9, 11, 0.25))


@pytest.mark.parametrize("spec, message", [
    ("5:3@0.5", r"route 0 \(5:3@0.5\): start=5 comes after end=3"),
    ("2:12@0.5", r"route 0 \(2:12@0.5\): end=12 is outside .* 12 blocks"),
    ("-13:3@0.5", r"route 0 .*start=-13 is outside"),
    ("2:6@0.5,6:8@0.5", r"route 1 \(6:8@0.5\) starts at block 6, .* route 0 \(2:6@0.5"),
    ("6:8@0.5,1:3@0.5", r"route 1 \(1:3@0.5\) .* sorted and must not overlap"),
])
def test_resolve_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_spec(spec).resolve(12)


def test_single_route_dict_under_routes():
    spec = parse_spec({"routes": {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 8}})
    assert spec.routes == (Route(2, 8, 0.5),)
