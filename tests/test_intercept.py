"""The one interception seam: layers sit at their slot whatever order they were added in, and come off in
any order, giving back the object's own forward, class and signature."""
import inspect

import pytest
import torch

from accel import intercept


class Block(torch.nn.Module):
    def forward(self, x, scale=1.0):
        return x * scale


class Pipeline:
    def __call__(self, prompt, steps=2):
        return f"{prompt}/{steps}"


def tagging(tag, seen):
    def layer(inner, *args, **kwargs):
        seen.append(f"{tag}>")
        out = inner(*args, **kwargs)
        seen.append(f"<{tag}")
        return out

    return layer


@pytest.mark.parametrize("order", [("cfg", "sequence", "cache"), ("cache", "cfg", "sequence"),
                                   ("sequence", "cache", "cfg")])
def test_layers_run_in_slot_order_whatever_order_they_were_added_in(order):
    block, seen = Block(), []
    undo = [intercept.around(block, "forward", slot, tagging(slot, seen)) for slot in order]
    assert block(torch.ones(1), scale=2.0).item() == 2.0
    assert seen == ["cfg>", "sequence>", "cache>", "<cache", "<sequence", "<cfg"]
    for remove in undo:
        remove()
    assert "forward" not in block.__dict__ and intercept._LAYERS not in block.__dict__


def test_a_replaced_computation_sits_below_every_layer_and_comes_off_alone():
    block, seen = Block(), []
    remove_layer = intercept.around(block, "forward", "cache", tagging("cache", seen))
    remove_own = intercept.replace(block, "forward", lambda own: lambda x, scale=1.0: own(x, scale) + 1)
    assert block(torch.ones(1), scale=3.0).item() == 4.0 and seen == ["cache>", "<cache"]
    remove_layer()
    assert block(torch.ones(1), scale=3.0).item() == 4.0  # still replaced
    remove_own()
    assert block(torch.ones(1), scale=3.0).item() == 3.0 and "forward" not in block.__dict__


def test_a_layered_forward_keeps_the_signature_that_later_bindings_read():
    block = Block()
    signature = inspect.signature(block.forward)
    remove = intercept.around(block, "forward", "cache", lambda inner, *a, **k: inner(*a, **k))
    assert inspect.signature(block.forward) == signature
    remove()


def test_a_call_is_intercepted_through_a_subclass_and_the_own_class_comes_back():
    pipe, seen = Pipeline(), []
    remove = intercept.around(pipe, "__call__", "cache", tagging("cache", seen))
    assert type(pipe) is not Pipeline and isinstance(pipe, Pipeline) and type(pipe).__name__ == "Pipeline"
    assert inspect.signature(type(pipe).__call__) == inspect.signature(Pipeline.__call__)
    assert pipe("fox", steps=3) == "fox/3" and seen == ["cache>", "<cache"]
    other = Pipeline()
    assert other("cat") == "cat/2" and seen == ["cache>", "<cache"]  # another instance is untouched
    remove()
    assert type(pipe) is Pipeline and intercept._LAYERS not in pipe.__dict__


def test_context_layers_enter_and_leave_around_each_call():
    import contextlib

    pipe, seen = Pipeline(), []

    @contextlib.contextmanager
    def scope():
        seen.append("enter")
        yield
        seen.append("leave")

    remove = intercept.around_each(pipe, "__call__", "cache", scope)
    pipe("a")
    pipe("b")
    assert seen == ["enter", "leave", "enter", "leave"]
    remove()
    pipe("c")
    assert seen == ["enter", "leave", "enter", "leave"]


def test_an_unknown_slot_is_refused():
    with pytest.raises(ValueError, match="unknown slot 'middle'"):
        intercept.around(Block(), "forward", "middle", lambda inner, *a, **k: inner(*a, **k))
