"""A small two-module model trained under heterogeneous layouts, and its single-process reference.

"vision": x -> tanh(x W1^T + b1) W2^T + b2, tensor-parallel (W1/b1 split by rows, W2 by columns, b2
replicated), data-parallel over samples. "language": gain * vision(x), then residual layers
h + tanh(h W_l^T + b_l) stacked as one [L, d, d] tensor split over pipeline stages, a head on the
last stage, and an MSE loss; data-parallel over samples. Activations cross from the vision ranks
to the language ranks (disjoint or colocated) with point-to-point sends, and their grads go back.

`reference_run` trains the same model from the same weights and data in one process with plain
torch (clip_grad_norm_, AdamW, LambdaLR), independent of optim/ and mimo_ckpt/.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from mimo_ckpt.layout import ModuleLayout
from mimo_ckpt.shard import TensorShard

D_IN, HIDDEN, D_MODEL, LAYERS, D_OUT, BATCH = 6, 8, 8, 4, 3, 8
LR = {"vision": 0.02, "language": 0.01}
WEIGHT_DECAY = 0.01
# Per-module schedules: a warmup for the encoder, a decay for the language model.
LR_LAMBDAS: dict[str, Callable[[int], float]] = {
    "vision": lambda s: min(1.0, (s + 1) / 3),
    "language": lambda s: 0.9**s,
}


def full_weights(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.5) -> torch.Tensor:
        return (torch.rand(shape, generator=g) * 2 - 1) * scale

    return {
        "vision": {
            "encoder.fc1.weight": rand(HIDDEN, D_IN),
            "encoder.fc1.bias": rand(HIDDEN),
            "encoder.fc2.weight": rand(D_MODEL, HIDDEN),
            "encoder.fc2.bias": rand(D_MODEL),
        },
        "language": {
            "input.gain": torch.tensor(1.5),
            "decoder.layers.weight": rand(LAYERS, D_MODEL, D_MODEL, scale=0.4),
            "decoder.layers.bias": rand(LAYERS, D_MODEL, scale=0.2),
            "head.weight": rand(D_OUT, D_MODEL),
        },
    }


def batch(step: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step)
    return torch.randn(BATCH, D_IN, generator=g), torch.randn(BATCH, D_OUT, generator=g)


def local_boxes(module: str, layout: ModuleLayout, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """key -> (global offset, local shape) of every parameter this rank holds."""
    c = layout.coords(rank)
    if module == "vision":
        if (layout.cp, layout.ep, layout.pp) != (1, 1, 1):
            raise ValueError(f"the toy encoder runs TP x DP only, not {layout.describe()}")
        rows = HIDDEN // layout.tp
        r0 = c["tp"] * rows
        return {
            "encoder.fc1.weight": ((r0, 0), (rows, D_IN)),
            "encoder.fc1.bias": ((r0,), (rows,)),
            "encoder.fc2.weight": ((0, r0), (D_MODEL, rows)),
            "encoder.fc2.bias": ((0,), (D_MODEL,)),
        }
    if (layout.tp, layout.cp, layout.ep) != (1, 1, 1):
        raise ValueError(f"the toy language model runs PP x DP only, not {layout.describe()}")
    per = LAYERS // layout.pp
    l0 = c["pp"] * per
    out = {
        "decoder.layers.weight": ((l0, 0, 0), (per, D_MODEL, D_MODEL)),
        "decoder.layers.bias": ((l0, 0), (per, D_MODEL)),
    }
    if c["pp"] == 0:
        out["input.gain"] = ((), ())
    if c["pp"] == layout.pp - 1:
        out["head.weight"] = ((0, 0), (D_OUT, D_MODEL))
    return out


def _box(t: torch.Tensor, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor:
    return t[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


class _SumOverGroup(torch.autograd.Function):
    """All-reduce in forward; identity in backward (each rank already holds the full output grad)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _exchange(sends: list[tuple[int, torch.Tensor]], recvs: list[tuple[int, torch.Tensor]], rank: int) -> None:
    """Post all point-to-point transfers of one phase, then wait; a rank talking to itself copies."""
    ops = [dist.P2POp(dist.isend, t, dst) for dst, t in sends if dst != rank]
    ops += [dist.P2POp(dist.irecv, buf, src) for src, buf in recvs if src != rank]
    to_self = [t for dst, t in sends if dst == rank]
    for buf, t in zip([buf for src, buf in recvs if src == rank], to_self, strict=True):
        buf.copy_(t)
    for work in dist.batch_isend_irecv(ops) if ops else []:
        work.wait()


@dataclass
class _Route:
    """Rows [begin, end) of the global batch moving from a vision rank to a language rank."""

    src: int
    dst: int
    begin: int
    end: int


class ToyMimo:
    """This rank's part of the toy model under the given layouts."""

    def __init__(self, layouts: dict[str, ModuleLayout], rank: int, tp_group: Any = None,
                 weights: dict[str, dict[str, torch.Tensor]] | None = None, device: str = "cpu") -> None:
        self.layouts, self.rank, self.tp_group, self.device = layouts, rank, tp_group, torch.device(device)
        weights = weights or full_weights()
        self.global_shapes = {m: {k: tuple(v.shape) for k, v in w.items()} for m, w in weights.items()}
        self.params: dict[str, dict[str, torch.nn.Parameter]] = {}
        self.boxes: dict[str, dict[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {}
        for module, layout in layouts.items():
            if layout.contains(rank):
                self.boxes[module] = local_boxes(module, layout, rank)
                self.params[module] = {
                    key: torch.nn.Parameter(_box(weights[module][key], off, shape).to(self.device, copy=True))
                    for key, (off, shape) in self.boxes[module].items()
                }
        self.routes = self._routes()

    def _routes(self) -> list[_Route]:
        vis, lang = self.layouts["vision"], self.layouts["language"]
        out = []
        for j in range(lang.dp):
            lb, le = j * BATCH // lang.dp, (j + 1) * BATCH // lang.dp
            for i in range(vis.dp):
                vb, ve = i * BATCH // vis.dp, (i + 1) * BATCH // vis.dp
                if max(lb, vb) < min(le, ve):
                    for t in range(vis.tp):
                        out.append(_Route(vis.rank_of(dp=i, tp=t), lang.rank_of(dp=j, pp=0), max(lb, vb), min(le, ve)))
        return out

    def sharded_params(self, module: str) -> list[Any]:
        from optim import ShardedParam

        return [
            ShardedParam(key, p, self.global_shapes[module][key], self.boxes[module][key][0])
            for key, p in self.params[module].items()
        ]

    def model_state(self, module: str) -> dict[str, TensorShard]:
        return {sp.key: TensorShard(sp.key, sp.param.data, sp.global_shape, sp.global_offset)
                for sp in self.sharded_params(module)}

    def forward_backward(self, step: int, loss_scale: float = 1.0) -> float | None:
        """One step's forward and backward on the global batch; the loss on last-stage ranks."""
        x, target = (t.to(self.device) for t in batch(step))
        vis, lang = self.layouts["vision"], self.layouts["language"]
        enc_out, vis_begin = None, 0
        if "vision" in self.params:
            c = vis.coords(self.rank)
            b, e = c["dp"] * BATCH // vis.dp, (c["dp"] + 1) * BATCH // vis.dp
            p = self.params["vision"]
            h = torch.tanh(x[b:e] @ p["encoder.fc1.weight"].T + p["encoder.fc1.bias"])
            partial = h @ p["encoder.fc2.weight"].T
            if vis.tp > 1:
                partial = _SumOverGroup.apply(partial, self.tp_group)
            enc_out = partial + p["encoder.fc2.bias"]
            vis_begin = b

        lang_c = lang.coords(self.rank) if "language" in self.params else None
        lb = le = 0
        if lang_c is not None:
            lb, le = lang_c["dp"] * BATCH // lang.dp, (lang_c["dp"] + 1) * BATCH // lang.dp
        # Vision -> language, first stage: only the tp-0 copy of each row block travels forward.
        inbox = torch.zeros(le - lb, D_MODEL, device=self.device)
        fwd = [r for r in self.routes if vis.coords(r.src)["tp"] == 0]
        sends = [(r.dst, enc_out[r.begin - vis_begin : r.end - vis_begin].detach().contiguous())
                 for r in fwd if r.src == self.rank]
        recvs = [(r.src, inbox[r.begin - lb : r.end - lb]) for r in fwd if r.dst == self.rank]
        _exchange(sends, recvs, self.rank)

        stage_in = stage_out = None
        loss_value = None
        if lang_c is not None:
            s, p = lang_c["pp"], self.params["language"]
            if s == 0:
                stage_in = inbox.requires_grad_()
                h = p["input.gain"] * stage_in
            else:
                stage_in = torch.empty(le - lb, D_MODEL, device=self.device)
                dist.recv(stage_in, lang.rank_of(pp=s - 1, dp=lang_c["dp"]))
                h = stage_in.requires_grad_()
            for i in range(LAYERS // lang.pp):
                h = h + torch.tanh(h @ p["decoder.layers.weight"][i].T + p["decoder.layers.bias"][i])
            if s < lang.pp - 1:
                dist.send(h.detach().contiguous(), lang.rank_of(pp=s + 1, dp=lang_c["dp"]))
                stage_out = h
            else:
                y = h @ p["head.weight"].T
                loss = ((y - target[lb:le]) ** 2).sum() / (BATCH * D_OUT)
                loss_value = loss.detach().clone()
                (loss * loss_scale).backward()
            if stage_out is not None:
                grad = torch.empty_like(stage_out)
                dist.recv(grad, lang.rank_of(pp=s + 1, dp=lang_c["dp"]))
                stage_out.backward(grad)
            if s > 0:
                dist.send(stage_in.grad.contiguous(), lang.rank_of(pp=s - 1, dp=lang_c["dp"]))

        # Language first stage -> every tp rank of the vision replica that produced the rows.
        sends = [(r.src, stage_in.grad[r.begin - lb : r.end - lb].contiguous())
                 for r in self.routes if r.dst == self.rank]
        enc_grad = torch.zeros_like(enc_out) if enc_out is not None else None
        recvs = [(r.dst, enc_grad[r.begin - vis_begin : r.end - vis_begin]) for r in self.routes if r.src == self.rank]
        _exchange(sends, recvs, self.rank)
        if enc_out is not None:
            enc_out.backward(enc_grad)
        return None if loss_value is None else float(loss_value)

    def sync_grads(self, dp_groups: dict[str, Any]) -> None:
        """Sum grads over each module's data-parallel ranks (the loss is already a global mean)."""
        for module, params in self.params.items():
            for p in params.values():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=dp_groups[module])


def reference_run(steps: int, max_grad_norm: float) -> dict[str, Any]:
    """Single-process training: losses, grad norms, lrs per step, and the final weights."""
    weights = full_weights()
    params = {m: {k: torch.nn.Parameter(v.clone()) for k, v in w.items()} for m, w in weights.items()}
    opts = {m: torch.optim.AdamW(list(ps.values()), lr=LR[m], weight_decay=WEIGHT_DECAY) for m, ps in params.items()}
    scheds = {m: torch.optim.lr_scheduler.LambdaLR(o, LR_LAMBDAS[m]) for m, o in opts.items()}
    out: dict[str, Any] = {"loss": [], "grad_norm": [], "lr": []}
    everything = [p for ps in params.values() for p in ps.values()]
    for step in range(steps):
        x, target = batch(step)
        v, lang = params["vision"], params["language"]
        h = torch.tanh(x @ v["encoder.fc1.weight"].T + v["encoder.fc1.bias"])
        h = lang["input.gain"] * (h @ v["encoder.fc2.weight"].T + v["encoder.fc2.bias"])
        for i in range(LAYERS):
            h = h + torch.tanh(h @ lang["decoder.layers.weight"][i].T + lang["decoder.layers.bias"][i])
        loss = ((h @ lang["head.weight"].T - target) ** 2).mean()
        for p in everything:
            p.grad = None
        loss.backward()
        out["loss"].append(loss.item())
        out["lr"].append({m: o.param_groups[0]["lr"] for m, o in opts.items()})
        norm = torch.nn.utils.clip_grad_norm_(everything, max_grad_norm if max_grad_norm > 0 else float("inf"))
        out["grad_norm"].append(float(norm))
        for m in opts:
            opts[m].step()
            scheds[m].step()
    out["weights"] = {m: {k: p.detach() for k, p in ps.items()} for m, ps in params.items()}
    return out
