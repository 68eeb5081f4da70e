"""Token routing of the ``routed`` strategy, as pure tensor functions.

The experts of one layer are the num_A * num_B pairs (B_j, A_i); a router (a linear map of the layer input, E =
num_B * num_A outputs, expert e = j * num_A + i, the row-major order of the pairing M) gives each token softmax gates
g (num_B x num_A) and the update is

    dW(x) x = s * sum_j sum_i g[j, i](x) * B_j A_i x        (dense: the gates sum to one)

With ``top_k`` = k > 0 only the k largest gates of a token are kept, not renormalised (Switch-style: the router
still gets a gradient from the main loss at k = 1). A constant router with gates M / sum(M) is the fixed pairing M
scaled by 1 / sum(M). Three token-sized GEMMs plus one batched mix, whatever num_A and num_B:

    h = x @ A_cat.T                     (T, num_A * r)     A side, expert-major: h[:, i*r:(i+1)*r] = A_i x
    m = g @ h.view(T, num_A, r)         (T, num_B, r)      the gated mix, one bmm: m_j = sum_i g[j, i] A_i x
    y = m.view(T, num_B * r) @ B_cat.T  (T, out)           B side: column j*r + k of B_cat is B_j[:, k]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .collaboration import scale_factors


def routed_factors(
    experts_A: torch.Tensor,
    experts_B: torch.Tensor,
    *,
    scaling: float,
    in_scale: torch.Tensor | None = None,
    out_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_cat: num_A*r x in, B_cat: out x num_B*r) in ``dtype``, with s and the fixed channel weights folded in."""
    num_A, r, in_features = experts_A.shape
    num_B, out_features, _ = experts_B.shape
    dtype = dtype or experts_A.dtype
    factor_A = experts_A.reshape(num_A * r, in_features).to(dtype)  # a view unless cast
    # (out, num_B, r): the reordering copy is the cast's own copy when the dtype changes
    by_out = experts_B.permute(1, 0, 2)
    by_out = by_out.contiguous() if dtype == by_out.dtype else by_out.to(dtype, memory_format=torch.contiguous_format)
    factor_B = by_out.view(out_features, num_B * r)
    return scale_factors(factor_A, factor_B, scaling=scaling, in_scale=in_scale, out_scale=out_scale, dtype=dtype)


def router_gates(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gates, probs, dispatch) from router logits (..., E), all in fp32 or wider: probs = softmax(logits); gates = probs, or
    with ``top_k`` > 0 the top_k largest probs of each token (others 0, not renormalised); dispatch: one-hot of the
    chosen experts (of the argmax when dense), what the load-balancing loss counts."""
    # at least fp32 (a half-precision cast fused into the softmax)
    probs = logits.softmax(-1, dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32)
    num_experts = probs.shape[-1]
    chosen = probs.topk(top_k if 0 < top_k < num_experts else 1, dim=-1).indices
    dispatch = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
    if 0 < top_k < num_experts:
        gates = probs * dispatch
    else:
        gates = probs
    return gates, probs, dispatch


def routed_update(
    x: torch.Tensor,
    router_input: torch.Tensor,
    factor_A: torch.Tensor,
    factor_B: torch.Tensor,
    router_weight: torch.Tensor,
    router_bias: torch.Tensor,
    num_A: int,
    num_B: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(update (..., out), probs (T, E), dispatch (T, E)) of the routed experts on ``x`` (..., in); the router reads
    ``router_input`` (the layer input before adapter dropout)."""
    logits = F.linear(router_input, router_weight, router_bias)  # (..., E)
    gates, probs, dispatch = router_gates(logits.reshape(-1, num_B * num_A), top_k)  # (T, E)
    hidden = F.linear(x, factor_A)  # (..., num_A * r)
    rank = hidden.shape[-1] // num_A
    mixed = torch.bmm(gates.view(-1, num_B, num_A).to(hidden.dtype), hidden.reshape(-1, num_A, rank))  # (T, num_B, r)
    update = F.linear(mixed.view(*x.shape[:-1], num_B * rank), factor_B)  # (..., out)
    return update, probs, dispatch


def load_balancing_loss(probs: torch.Tensor, dispatch: torch.Tensor, per_token: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, load): Switch Transformer's auxiliary loss E * sum_e f_e P_e over the tokens (T, E) of one layer, with
    f_e the fraction of the dispatches that went to expert e (``per_token`` dispatches per token; ``load`` is
    per_token * f, detached) and P_e the mean gate probability of e. 1 when the load is uniform, E when every token goes to one expert;
    differentiable through P."""
    num_experts = probs.shape[-1]
    load = dispatch.mean(0)  # (E,): sums to per_token
    loss = (load * probs.mean(0)).sum() * (num_experts / per_token)
    return loss, load.detach()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens (T, E) of the gate distribution's entropy (nats; log E when uniform, 0 when one-hot)."""
    return torch.special.xlogy(probs, probs).sum() * (-1.0 / probs.shape[0])


class RoutingLog:
    """What the routed layers of one model recorded: the auxiliary losses of the current training forward (with
    their graph, for the training loss) and the detached statistics since the last ``summary`` (kept on the device:
    recording launches no kernel of its own and never waits for it)."""

    FOLD_AFTER = 1024  # records kept before they are summed into one (bounded memory when nobody reads them)

    def __init__(self) -> None:
        self.losses: list[torch.Tensor] = []
        # a trainable router ran without autograd (reentrant gradient checkpointing's first pass): its loss has no graph
        self.detached = False
        self._records: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (loss, entropy, load (E,))
        self._count = 0

    def new_forward(self) -> None:
        self.losses, self.detached = [], False

    def record(self, probs: torch.Tensor, dispatch: torch.Tensor, per_token: int, detached: bool = False) -> None:
        loss, load = load_balancing_loss(probs, dispatch, per_token)
        self.losses.append(loss)
        self.detached = self.detached or detached
        self._records.append((loss.detach(), routing_entropy(probs.detach()), load))
        self._count += 1
        if len(self._records) >= self.FOLD_AFTER:
            self._records = [tuple(torch.stack(column).sum(0) for column in zip(*self._records))]

    def summary(self) -> dict[str, float]:
        """Means since the last call (then reset): router_aux_loss, routing_entropy (nats), and the expert load as
        the smallest and largest fraction of dispatches times E (1 = balanced). Empty when nothing was recorded."""
        if not self._count:
            return {}
        loss, entropy, load = (torch.stack(column).sum(0) / self._count for column in zip(*self._records))
        load = load * (load.numel() / load.sum())  # E * f_e
        self._records, self._count = [], 0
        return {"router_aux_loss": loss.item(), "routing_entropy": entropy.item(),
                "expert_load_min": load.min().item(), "expert_load_max": load.max().item()}
