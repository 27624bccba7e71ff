"""Backprop inspector: one forward and one backward pass, shown step by step as the seed tutorials do.

`inspect_backprop(model, loss_fn, x, y)` returns an `Inspection` (records.py): the traced pass
(tracing.py), the chain-rule check and, on request, the finite-difference check (checks.py).
`rendering.py` prints it as text, JSON or DOT. Everything here is plain torch: Hydra and the
command line live in scripts/inspect_backprop.py.
"""

import torch
from torch import nn

from gradwatch.inspect.checks import ClosedForm, chain_rule_check, gradient_check, seed003_closed_form
from gradwatch.inspect.records import Inspection
from gradwatch.inspect.tracing import trace_pass


def inspect_backprop(
    model: nn.Module,
    loss_fn: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    gradcheck: bool = False,
    closed_form: ClosedForm = seed003_closed_form,
) -> Inspection:
    """The whole record: the traced pass, the chain-rule check and, on request, the gradient check."""
    record = trace_pass(model, loss_fn, x, y)
    record.chain_rule = chain_rule_check(model, loss_fn, x, y, closed_form)
    if gradcheck:
        record.gradcheck = gradient_check(model, loss_fn, x, y)
    return record


