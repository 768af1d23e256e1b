"""Creating a torch optimizer's state before its first step, so that a load has tensors to fill."""

from __future__ import annotations

import torch

__all__ = ["materialise_state"]

SCALAR_STATE = frozenset({"step"})  # per-parameter scalars torch keeps as 0-d tensors


@torch.no_grad()
def materialise_state(optimizer: torch.optim.Optimizer, step: int = 0) -> None:
    """Give every parameter without state zeroed state and `step`; parameters and grads are unchanged.

    torch optimizers create state lazily in `step()`, so one step runs with zero grads on exactly
    those parameters (the others have no grad and are skipped), after which their values are put
    back and the new state is zeroed: as if never stepped, whatever the update rule did.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    missing = {id(p) for p in params if not optimizer.state.get(p)}
    if not missing:
        return
    grads = [p.grad for p in params]
    kept = {id(p): p.detach().clone() for p in params if id(p) in missing}
    for p in params:
        p.grad = torch.zeros_like(p) if id(p) in missing else None
    optimizer.step()
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
        if id(p) in missing:
            p.copy_(kept[id(p)])
            state = optimizer.state[p]
            for name, value in state.items():
                if name in SCALAR_STATE and torch.is_tensor(value):
                    state[name] = torch.full_like(value, step)
                elif name in SCALAR_STATE:
                    state[name] = type(value)(step)
                elif torch.is_tensor(value):
                    value.zero_()
