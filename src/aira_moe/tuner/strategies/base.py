"""What a collaboration strategy (``cola_strategy``) is to the layer: one object per strategy, shared by every layer,
that owns the strategy's behaviour as peft's ``LoraVariant`` owns DoRA's -- what it adds to a layer, the layer's update
in the forward, its delta weight for merge and export (or the refusal), and the shapes calibration needs. The layer
(tuner/layer.py) calls these methods and never asks which strategy it holds."""

from __future__ import annotations

from typing import Optional

import torch

from ...errors import UserError


class TokenDependentUpdateError(UserError):
    """An adapter whose update depends on the token has no fixed weight update: merging it, exporting it as a LoRA or
    listing it before other adapters (which are merged) is refused; the message says why and what to do instead."""


class CollaborationStrategy:
    """How the A and B experts of a layer collaborate. ``layer`` is the AiraMoeLayer, ``adapter_name`` one of its
    adapters; the experts are ``layer.aira_moe_A[adapter_name]`` (num_A, r, in) and ``layer.aira_moe_B[adapter_name]``
    (num_B, out, r), and ``layer.strategy_options[adapter_name]`` holds the strategy's options (``cola_seed``,
    ``router_top_k``, ...) as the config gave them."""

    name: str = ""
    # the update depends on the token: there is no fixed dW, so no merge and no export as a standard LoRA
    token_dependent: bool = False
    # why, in a few words, for the refusal (token-dependent strategies only)
    token_dependence: str = ""

    def init(self, layer, adapter_name: str, num_A: int, num_B: int) -> None:
        """Add what the strategy keeps per adapter besides the experts (``update_layer`` calls it)."""

    def reset_parameters(self, layer, adapter_name: str) -> None:
        """Initialise what ``init`` added: called after the experts' init, under no_grad, from the same generator."""

    def forward(self, layer, adapter_name: str, x: torch.Tensor, dtype: torch.dtype,
                rank_multiple: int) -> torch.Tensor:
        """The update of ``x`` (..., in) -> (..., out), computed in ``dtype`` (autocast's, else x's); a strategy may pad
        the inner dimension of its token-sized GEMMs to a multiple of ``rank_multiple`` (tensor cores)."""
        raise NotImplementedError

    def delta_weight_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with dW = B @ A in the experts' dtype, the update merge adds to the base weight (eval pairing)."""
        raise NotImplementedError

    def initial_factors(self, layer, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) with B @ A = the update right after ``layer.set_initial_update`` made every A the target A and every
        B the target B / (s * pairing_total): what the AwSVD 'residual' init subtracts from the base weight."""
        raise NotImplementedError

    def fold(self, experts_A: torch.Tensor, experts_B: torch.Tensor, *, scaling: float,
             pairing: Optional[torch.Tensor] = None, in_scale: Optional[torch.Tensor] = None,
             out_scale: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None):
        """(A_eff, B_eff) with dW = B_eff @ A_eff for saved experts, no layer needed (export); ``pairing``: a pairing M
        to fold with (None: the strategy's eval pairing). Arguments as ``collaboration.fold_experts``."""
        raise NotImplementedError

    def pairing_total(self, num_A: int, num_B: int) -> float:
        """Sum of the entries of M (of every sampled M; of the gates when token-dependent): spreads a target update
        over the copies (AwSVD 'residual' init)."""
        raise NotImplementedError

    def initial_width(self, r: int, num_A: int) -> int:
        """Inner width of the saved AwSVD initial pair (init_B @ init_A)."""
        return r

    def config_note(self, num_A: int, num_B: int, r: int) -> Optional[str]:
        """A one-line note on this configuration that the parsers log (``llamafactory-cli train``, ``aira-moe
        check``), or None."""
        return None

    def refuse_token_dependent(self, what: str, source: str = "") -> None:
        """The one refusal of a token-dependent update: raise TokenDependentUpdateError when ``what`` ("merged into
        ...", "exported as ...") needs a fixed weight update this strategy does not have; ``source`` (an adapter path)
        leads the message. Nothing for the other strategies."""
        if not self.token_dependent:
            return
        lead = f"{source}: " if source else ""
        raise TokenDependentUpdateError(
            f"{lead}a `cola_strategy: {self.name}` adapter cannot be {what}: its update depends on the token "
            f"({self.token_dependence}), so no fixed weight equals it; serve it unmerged instead (peft "
            "PeftModel.from_pretrained, or llamafactory-cli chat / api with `adapter_name_or_path`)"
        )
