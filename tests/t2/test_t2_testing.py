"""The test helpers themselves: a tree comparison must fail on mismatched or empty trees."""

import numpy as np
import pytest

from t2_jax import testing


def tree():
    return {"a": np.arange(3.0, dtype=np.float32), "b": {"c": np.ones((2, 2), np.float32)}}


def test_equal_trees_pass_and_tolerances_apply():
    testing.assert_trees_close(tree(), tree())
    nudged = tree()
    nudged["a"] = nudged["a"] + np.float32(1e-3)
    testing.assert_trees_close(nudged, tree(), atol=2e-3)
    with pytest.raises(AssertionError, match="leaf a"):
        testing.assert_trees_close(nudged, tree())


@pytest.mark.parametrize("change,message", [
    (lambda t: t.pop("a"), r"missing \['a'\]"),
    (lambda t: t["b"].update(d=np.zeros(1, np.float32)), r"unexpected \['b/d'\]"),
    (lambda t: t.update(a=np.arange(4.0, dtype=np.float32)), r"leaf a: shape \(4,\)"),
    (lambda t: t.update(a=np.arange(3.0)), "leaf a: dtype float64"),
])
def test_mismatched_trees_fail(change, message):
    # a zip without strict=True over the leaves would pass the first two
    other = tree()
    change(other)
    with pytest.raises(AssertionError, match=message):
        testing.assert_trees_close(other, tree())


def test_empty_trees_fail():
    with pytest.raises(AssertionError, match="no leaves"):
        testing.assert_trees_close({}, {})
    with pytest.raises(AssertionError, match="no leaves"):
        testing.assert_trees_close(tree(), {})
